# One venv, made from pyproject.toml; the stamp file makes a second `make` install nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
STORE  ?= local
DEMO_DIR ?= demo-out
SPEECH ?=

.PHONY: venv demo test test-slow bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py --out $(DEMO_DIR) --store $(STORE)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) tools/bench.py all --out bench-out $(if $(SPEECH),--speech $(SPEECH))

clean:
	rm -rf $(VENV) $(DEMO_DIR) bench-out
