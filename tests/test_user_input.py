"""Property tests over what users type: any trial file, recipe or override either works or stops with
one line (RecipeError, or ValueError naming the file), never a traceback of another kind."""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voxstream.model.evaluate import read_trials
from voxstream.model.methods import METHODS
from voxstream.model.recipe import SECTIONS, RecipeError, load_recipe, recipe_from_dict, recipe_to_dict

# Derandomized: the same examples on every run, so a failure is a regression and never a fluke.
CHECK = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                 suppress_health_check=list(HealthCheck))

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["", "ecapa", "resnet34", "sgd", "adamw", "simclr", "dino",
                                                           "same-utterance", "float16", "s3://b/x"]))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=4), st.dictionaries(st.text(max_size=6), SCALARS, max_size=3))


def _keys(section: str) -> list[str]:
    """The real keys of a section (every method's for `method`), so examples reach the range checks."""
    tree = recipe_to_dict(recipe_from_dict({"method": {"name": "simclr"}}))
    if section == "method":
        return sorted({f.name for m in METHODS.values() for f in dataclasses.fields(m.Config)})
    return sorted(tree[section])


KEYS = {s: _keys(s) for s in SECTIONS}
SECTION_TREES = st.sampled_from(SECTIONS).flatmap(lambda s: st.tuples(
    st.just(s), st.dictionaries(st.one_of(st.sampled_from(KEYS[s]), st.text(max_size=6)), VALUES, max_size=4)))


def _tree(method: str, sections: list[tuple[str, dict]]) -> dict:
    """Sections as drawn, the method section naming a method unless the draw set a name."""
    tree = dict(sections)
    tree["method"] = {"name": method, **tree.get("method", {})}
    return tree


TREES = st.one_of(st.builds(_tree, st.sampled_from(list(METHODS)), st.lists(SECTION_TREES, max_size=4)), VALUES)


def one_line(error: Exception) -> None:
    text = str(error)
    assert text and "\n" not in text, repr(text)


@CHECK
@given(TREES)
def test_any_recipe_tree_validates_or_is_one_recipe_error(tree):
    try:
        recipe_from_dict(tree)
    except RecipeError as e:
        one_line(e)


OVERRIDES = st.one_of(
    st.tuples(st.sampled_from(SECTIONS), st.sampled_from(sorted({k for ks in KEYS.values() for k in ks})),
              st.one_of(st.text(max_size=10), st.sampled_from(["-5", "0", "-1", ".nan", ".inf", "[1, -2]", "{a: 1}",
                                                               "[", "1e9", "true", "null"])))
    .map(lambda t: f"{t[0]}.{t[1]}={t[2]}"),
    st.text(max_size=20))


@CHECK
@given(st.one_of(st.text(max_size=40), TREES.map(yaml.safe_dump)), st.lists(OVERRIDES, max_size=3))
def test_any_recipe_file_and_overrides_load_or_are_one_recipe_error(text, overrides):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "r.yaml"
        path.write_text(text)
        try:
            load_recipe(str(path), overrides)
        except RecipeError as e:
            one_line(e)


TOKENS = st.one_of(st.sampled_from(["0", "1", "2", "a/x/1.wav", "b/y/2.wav", "a/x/1.wav", "-1", "#"]),
                   st.text(alphabet=st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=5))
LINES = st.lists(TOKENS, max_size=4).map(" ".join)


@CHECK
@given(st.one_of(st.lists(LINES, max_size=8).map(lambda ls: "\n".join(ls).encode()), st.binary(max_size=40)))
def test_any_trial_file_reads_or_is_one_line_naming_it(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trials.txt"
        path.write_bytes(data)
        try:
            trials = read_trials(str(path))
        except ValueError as e:
            one_line(e)
            assert str(e).startswith(str(path)), str(e)
        else:
            assert len(trials.labels) == len(trials.enroll) == len(trials.test) > 0
