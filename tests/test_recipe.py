"""Recipes: YAML + key=value overrides into dataclasses, one-line errors; LR/WD schedules."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from voxstream.model.recipe import RecipeError, load_recipe, method_config, recipe_from_dict, recipe_to_dict
from voxstream.model.schedules import cosine, warmup_cosine

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.stem.startswith("chain"))  # chains: test_chain


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"train": "s3://bucket/vox2", "batch_size": 8, "views": [2.0, 2.0]},
        "method": {"name": "simclr", "temperature": 0.1},
        "optim": {"name": "adamw", "lr": 0.001},
        "train": {"out_dir": "runs/x", "epochs": 3}}))
    return path


def test_yaml_and_overrides_reach_the_dataclasses(recipe_file):
    r = load_recipe(str(recipe_file), ["optim.lr=5e-4", "data.views=[4.0, 2.0, 2.0]", "train.bf16=false",
                                       "data.train=s3://other/{000000..000009}.tar", "method.temperature=1"])
    assert r.optim.lr == 5e-4 and r.optim.name == "adamw"
    assert r.data.views == [4.0, 2.0, 2.0] and r.data.batch_size == 8
    assert r.data.train == "s3://other/{000000..000009}.tar"
    assert r.train.bf16 is False and r.train.epochs == 3
    assert r.method.temperature == 1.0 and isinstance(r.method.temperature, float)
    assert type(r.method).__module__ == "voxstream.model.methods.simclr"


def test_recipe_round_trips_through_a_dict(recipe_file):
    r = load_recipe(str(recipe_file), ["train.seed=7"])
    again = recipe_from_dict(recipe_to_dict(r))
    assert again == r
    assert yaml.safe_load(yaml.safe_dump(recipe_to_dict(r))) == recipe_to_dict(r)


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", "optim.lrr: unknown key; valid keys: name, lr, final_lr"),
    ("train.epochs=many", "train.epochs: expected int, got 'many'"),
    ("train.epochs=2.5", "train.epochs: expected int, got 2.5"),
    ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
    ("train.bf16=3", "train.bf16: expected bool, got 3"),
    ("data.views=[2.0, x]", "data.views[1]: expected float, got 'x'"),
    ("trian.epochs=1", "trian: unknown section; valid sections: data, augment, model, method, optim, train"),
    ("method.name=byol", "method.name: expected one of simclr"),
    ("method.temprature=0.1", "method.temprature: unknown key; valid keys: name, temperature"),
    ("optim.name=lamb", "optim.name: expected one of sgd, adamw, got 'lamb'"),
    ("epochs=3", "override 'epochs=3': expected section.key=value"),
    ("train.epochs", "override 'train.epochs': expected section.key=value"),
    # numbers out of range
    ("train.epochs=-1", "train.epochs: must be at least 1, got -1"),
    ("train.epochs=0", "train.epochs: must be at least 1, got 0"),
    ("train.ckpt_every=0", "train.ckpt_every: must be at least 1, got 0"),
    ("train.keep_last=-2", "train.keep_last: must be >= 0, got -2"),
    ("data.steps_per_epoch=0", "data.steps_per_epoch must be >= 1, got 0"),
    ("model.name=xyz", "model.name: expected one of ecapa, resnet34, got 'xyz'"),
    ("model.channels=-5", "model.channels: must be a positive multiple of 8 (Res2Net scale), got -5"),
    ("model.channels=12", "model.channels: must be a positive multiple of 8 (Res2Net scale), got 12"),
    ("model.embed_dim=0", "model.embed_dim: must be at least 1, got 0"),
    ("optim.lr=-0.1", "optim.lr: must be >= 0, got -0.1"),
    ("optim.lr=.nan", "optim.lr: must be >= 0, got nan"),
    ("optim.final_lr=.inf", "optim.final_lr: must be >= 0, got inf"),
    ("optim.betas=[0.9, 1.5]", "optim.betas: must be in [0, 1), got 1.5"),
    ("optim.betas=[0.9]", "optim.betas: expected [beta1, beta2], got [0.9]"),
    ("method.temperature=0", "method.temperature: must be > 0, got 0.0"),
    ("method.projector_output_dim=0", "method.projector_output_dim: must be at least 1, got 0"),
    ("augment.p_noise=-1", "augment.p_noise: must be >= 0, got -1.0"),
    ("augment.p_channel=2", "augment.p_channel: must be in [0, 1], got 2.0"),
    ("augment.snr_music=[15, 5]", "augment.snr_music: expected [low, high], got [15.0, 5.0]"),
    ("augment.babble_speakers=[0, 3]", "augment.babble_speakers: must be at least 1, got 0"),
    ("data.weights=[1.0, -1.0]", "data.weights: must be >= 0, got -1.0"),
])
def test_bad_keys_types_and_ranges_name_the_key(recipe_file, override, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(str(recipe_file), [override])
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_ranges_depend_on_the_model_and_method_named():
    ok = {"model": {"name": "resnet34", "channels": 12}, "method": {"name": "swav", "queue_size": 0}}
    assert recipe_from_dict(ok).model.channels == 12  # the thin ResNet has no Res2Net groups
    with pytest.raises(RecipeError, match=r"^method.queue_size: must be at least 1, got 0$"):
        recipe_from_dict({"method": {"name": "moco", "queue_size": 0}})
    with pytest.raises(RecipeError, match=r"^method.momentum: must be in \[0, 1\], got 1.5$"):
        recipe_from_dict({"method": {"name": "moco", "momentum": 1.5}})


def test_method_section_becomes_the_named_methods_config():
    moco = method_config({"name": "moco", "queue_size": 128})
    assert type(moco).__module__ == "voxstream.model.methods.moco" and moco.queue_size == 128
    with pytest.raises(RecipeError, match=r"^method\.queue_size: unknown key; valid keys: name, temperature"):
        method_config({"name": "simclr", "queue_size": 128})   # MoCo's key is not SimCLR's
    with pytest.raises(RecipeError, match=r"^method\.name: expected one of simclr, .*, got 'byol'"):
        method_config({"name": "byol"})


def test_the_method_registry_imports_nothing_above_it():
    """recipe.py reads `method:` sections through the registry: an import back, even inside a function, is a cycle."""
    above = {f"voxstream.model.{m}" for m in ("recipe", "checkpoint", "train", "evaluate")}
    for path in sorted((ROOT / "model" / "methods").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            else:
                continue
            assert not names & above, f"{path.name}:{node.lineno} imports {sorted(names & above)}"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(RecipeError, match="nope.yaml: recipe not found"):
        load_recipe(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(RecipeError, match="bad.yaml: not valid YAML"):
        load_recipe(str(bad))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path):
    r = load_recipe(str(path))
    assert r.data.steps_per_epoch > 0 and r.train.epochs > 0 and r.data.batch_size > 0


def test_warmup_then_cosine_to_the_final_value():
    total, warmup, peak, final = 100, 10, 1.0, 0.01
    lrs = [warmup_cosine(s, total, warmup, peak, final) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(peak)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))            # rising during warm-up
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))            # then never rising
    assert lrs[10] == pytest.approx(peak) and lrs[total] == pytest.approx(final)
    assert lrs[55] == pytest.approx((peak + final) / 2)               # half-way down the cosine
    assert cosine(0, 50, 0.04, 0.4) == pytest.approx(0.04) and cosine(50, 50, 0.04, 0.4) == pytest.approx(0.4)
    assert cosine(80, 50, 0.04, 0.4) == pytest.approx(0.4)           # held after the end
