"""Recipes: one YAML file (sections data, augment, model, method, optim, train, ssps) plus `key=value`
overrides from the command line, turned into plain dataclasses with every key and type checked.

A mistyped key must not silently train the default for hours, so an unknown key or a wrong type
stops with one line naming it (`optim.lr: expected float, got 'fast'`) and the valid keys, and so
does a number out of range (`train.epochs: must be at least 1, got -1`, table RANGES).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from voxstream.model.encoders import NETWORKS, EncoderConfig
from voxstream.model.methods import METHODS
from voxstream.model.methods.base import MethodConfig
from voxstream.model.ssps import SSPSConfig
from voxstream.pipeline.augment import AugmentConfig
from voxstream.pipeline.loader import DataConfig
from voxstream.shards import storage


class RecipeError(ValueError):
    """A bad recipe or override; the message is one line naming the key at fault."""


@dataclass
class OptimConfig:
    name: str = "sgd"               # sgd | adamw
    lr: float = 0.2                 # peak learning rate, reached after warm-up
    final_lr: float = 1e-5          # end of the cosine decay
    warmup_epochs: float = 2.0      # linear warm-up from ~0 to lr
    weight_decay: float = 5e-5      # start of its own cosine schedule (DINO raises it over training)
    final_weight_decay: float = 5e-5
    momentum: float = 0.9           # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw only
    grad_clip: float = 0.0          # max global grad norm; 0 turns clipping off


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"   # local path or fsspec URL: checkpoints, metrics.jsonl, TensorBoard
    epochs: int = 1                 # an epoch is data.steps_per_epoch steps on every rank
    log_every: int = 50             # steps between metric lines (and NaN checks)
    ckpt_every: int = 1000          # steps between checkpoints; one more is written at the end
    keep_last: int = 3              # periodic checkpoints kept
    bf16: bool = True               # bf16 autocast on CUDA (the fbank front-end and augmentation stay fp32)
    bf16_cpu: bool = False          # bf16 autocast on CPU too (with bf16): the CUDA path's numerics without a
                                    # GPU; faster than fp32 only on CPUs with bf16 units (AMX)
    sync_bn: bool = False           # SyncBatchNorm across ranks
    compile: bool = False           # torch.compile the encoder
    tensorboard: bool = False       # also write TensorBoard scalars to out_dir/tb (local out_dir only)
    trials: str = ""                # optional trial list `label enroll test` for periodic validation EER
    trials_audio: str = ""          # audio root the trial paths are relative to
    val_every: int = 0              # steps between validations; 0 = only at the end (if trials given)
    seed: int = 0                   # model init and augmentation draws (data.seed drives the stream)
    init: str = ""                  # checkpoint whose evaluation network the encoder starts from (fine-tuning;
                                    # heads start fresh); unused when the run resumes its own checkpoint
    storage_options: dict = field(default_factory=dict)  # fsspec options for out_dir (s3 keys, endpoint)
    create_bucket: bool = False     # an out_dir whose bucket does not exist is an error (a typo, likely);
                                    # true creates the bucket instead


@dataclass
class Recipe:
    data: DataConfig
    augment: AugmentConfig
    model: EncoderConfig
    method: MethodConfig
    optim: OptimConfig
    train: TrainConfig
    ssps: SSPSConfig = field(default_factory=SSPSConfig)


SECTIONS = ("data", "augment", "model", "method", "optim", "train", "ssps")
OPTIMIZERS = ("sgd", "adamw")

# The range of every number a recipe sets, as (wording, test); non-finite numbers fail every test.
AT_LEAST_1 = ("at least 1", lambda v: v >= 1)
POSITIVE = ("> 0", lambda v: v > 0)
NON_NEGATIVE = (">= 0", lambda v: v >= 0)
FRACTION = ("in [0, 1]", lambda v: 0 <= v <= 1)
BELOW_1 = ("in [0, 1)", lambda v: 0 <= v < 1)
ANY = ("finite", lambda v: True)
ECAPA_CHANNELS = ("a positive multiple of 8 (Res2Net scale)", lambda v: v >= 8 and v % 8 == 0)
# Keyed `section.key`, or `name.key` for a key of one model, method or optimizer; a list is checked item by item.
RANGES = {
    **{f"augment.{k}": NON_NEGATIVE for k in ("p_none", "p_reverb", "p_noise", "p_both", "p_categories",
                                              "noise_budget_mb", "rir_budget_mb", "refresh_interval",
                                              "channel_eq_db", "channel_tilt_db", "retry_backoff")},
    **{f"augment.{k}": ANY for k in ("snr_noise", "snr_music", "snr_babble")},
    **{f"augment.{k}": POSITIVE for k in ("segment_seconds", "rir_seconds", "channel_low_cut", "channel_high_cut")},
    "augment.babble_speakers": AT_LEAST_1, "augment.retry_attempts": AT_LEAST_1,
    "augment.refresh_fraction": FRACTION, "augment.p_channel": FRACTION,
    "data.weights": NON_NEGATIVE, "data.views": POSITIVE, "data.min_duration": POSITIVE, "data.workers": NON_NEGATIVE,
    "data.cache_gb": POSITIVE,
    "model.channels": AT_LEAST_1, "model.embed_dim": AT_LEAST_1, "model.n_mels": AT_LEAST_1,
    "ecapa.channels": ECAPA_CHANNELS,
    **{f"optim.{k}": NON_NEGATIVE for k in ("lr", "final_lr", "warmup_epochs", "weight_decay", "final_weight_decay",
                                            "grad_clip")},
    "optim.momentum": BELOW_1, "optim.betas": BELOW_1,
    **{f"train.{k}": AT_LEAST_1 for k in ("epochs", "log_every", "ckpt_every")},
    "train.keep_last": NON_NEGATIVE, "train.val_every": NON_NEGATIVE,
    **{f"method.{k}": AT_LEAST_1 for k in ("projector_hidden_dim", "projector_output_dim", "hidden_dim",
                                           "bottleneck_dim", "out_dim", "global_views", "prototypes",
                                           "sinkhorn_iterations", "assign_views")},
    **{f"method.{k}": POSITIVE for k in ("temperature", "student_temp", "teacher_temp", "warmup_teacher_temp",
                                         "sinkhorn_epsilon", "scale")},
    **{f"method.{k}": FRACTION for k in ("momentum", "center_momentum", "teacher_momentum", "margin_start",
                                         "margin_end", "warmup_teacher_temp_fraction", "freeze_last_layer_fraction",
                                         "queue_start_fraction", "freeze_prototypes_fraction")},
    **{f"method.{k}": NON_NEGATIVE for k in ("off_diagonal_weight", "inv_weight", "var_weight", "cov_weight",
                                             "margin", "classes")},  # AAM: classes from its labels file
    "moco.queue_size": AT_LEAST_1, "swav.queue_size": NON_NEGATIVE,  # SwAV: 0 turns its queue off
}
# Lists read as one (low, high) range.
PAIRS = ("augment.snr_noise", "augment.snr_music", "augment.snr_babble", "augment.babble_speakers",
         "augment.channel_low_cut", "augment.channel_high_cut")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string; recipes mean a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_value(text: str) -> Any:
    """A command-line value as a YAML scalar or list (`0.1`, `true`, `[4.0, 2.0]`); else the raw text."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


def apply_overrides(tree: dict, overrides: list[str], sections: tuple[str, ...] = SECTIONS) -> dict:
    """Set dotted keys (`optim.lr=0.1`) in a nested dict; checking happens when building sections."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or "." not in key:
            raise RecipeError(f"override {item!r}: expected section.key=value, sections: {', '.join(sections)}")
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            if node.get(part) is None:  # `augment:` with nothing under it is an empty section
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise RecipeError(f"override {item!r}: {part} is not a section")
        node[leaf] = parse_value(text)
    return tree


def redact_override(item: str) -> str:
    """`key=value` as it may be shown or written: a secret in the value (storage options) redacted."""
    key, sep, text = item.partition("=")
    leaf = key.rsplit(".", 1)[-1]
    value = parse_value(text)
    shown = storage.redact({leaf: value})[leaf]
    return item if not sep or shown == value else f"{key}={json.dumps(shown)}"


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) and not typing.get_args(tp) else str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp`, or RecipeError. Ints pass as floats; numbers pass as strings."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option, key)
            except RecipeError:
                pass
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, (list, tuple)):
            item = args[0] if args else Any
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            return dict(value)
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return build_section(tp, value, key)
    else:
        raise RecipeError(f"{key}: unsupported field type {_type_name(tp)}")
    raise RecipeError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def build_section(cls: type, values: dict | None, prefix: str) -> Any:
    """An instance of dataclass `cls` from a dict, every key known and every value of the right type."""
    values = values or {}
    if not isinstance(values, dict):
        raise RecipeError(f"{prefix}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in values:
        if key not in names:
            raise RecipeError(f"{prefix}.{key}: unknown key; valid keys: {', '.join(names)}")
    checked = {k: _coerce(v, hints[k], f"{prefix}.{k}") for k, v in values.items()}
    try:
        return cls(**checked)
    except ValueError as e:  # the section's own checks (__post_init__) name their key
        raise RecipeError(" ".join(str(e).split())) from None


def check_ranges(recipe: Recipe) -> None:
    """Every number of the recipe inside its RANGES entry, and every PAIRS list a (low, high) range."""
    for section in SECTIONS:
        cfg = getattr(recipe, section)
        for f in dataclasses.fields(cfg):
            key, value = f"{section}.{f.name}", getattr(cfg, f.name)
            wording, test = RANGES.get(f"{getattr(cfg, 'name', '')}.{f.name}") or RANGES.get(key) or ANY
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, (int, float)) and not isinstance(v, bool) and not (math.isfinite(v) and test(v)):
                    raise RecipeError(f"{key}: must be {wording}, got {v}")
            if key in PAIRS and not (len(value) == 2 and value[0] <= value[1]):
                raise RecipeError(f"{key}: expected [low, high], got {value}")
    if len(recipe.optim.betas) != 2:
        raise RecipeError(f"optim.betas: expected [beta1, beta2], got {recipe.optim.betas}")


def method_config(values: dict | None) -> MethodConfig:
    """The `method:` section as the Config of the method it names, every key and type checked."""
    name = (values or {}).get("name", "")
    if name not in METHODS:
        raise RecipeError(f"method.name: expected one of {', '.join(METHODS)}, got {name!r}")
    return build_section(METHODS[name].Config, values, "method")


def recipe_from_dict(tree: dict) -> Recipe:
    """A Recipe from a nested dict (a parsed YAML file, or the `recipe` entry of a checkpoint)."""
    if not isinstance(tree, dict):
        raise RecipeError(f"recipe: expected sections {', '.join(SECTIONS)}")
    for section in tree:
        if section not in SECTIONS:
            raise RecipeError(f"{section}: unknown section; valid sections: {', '.join(SECTIONS)}")
    classes = {"data": DataConfig, "augment": AugmentConfig, "model": EncoderConfig, "optim": OptimConfig,
               "train": TrainConfig, "ssps": SSPSConfig}
    recipe = Recipe(method=method_config(tree.get("method")),
                    **{s: build_section(cls, tree.get(s), s) for s, cls in classes.items()})
    if recipe.optim.name not in OPTIMIZERS:
        raise RecipeError(f"optim.name: expected one of {', '.join(OPTIMIZERS)}, got {recipe.optim.name!r}")
    if recipe.model.name not in NETWORKS:
        raise RecipeError(f"model.name: expected one of {', '.join(NETWORKS)}, got {recipe.model.name!r}")
    if recipe.train.bf16_cpu and not recipe.train.bf16:
        raise RecipeError("train.bf16_cpu: true needs train.bf16: true (bf16_cpu extends bf16 to CPU)")
    check_ranges(recipe)
    return recipe


def read_yaml(path: str) -> dict:
    """A recipe file as a nested dict (empty file: {}); a missing or malformed file, or one that is not a
    mapping of sections, is one RecipeError line."""
    try:
        tree = yaml.load(Path(path).read_text(), Loader=_Loader) or {}
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(tree, dict):
        raise RecipeError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)}), got {tree!r:.40}")
    return tree


def load_recipe(path: str, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply `key=value` overrides, check every key and type."""
    return recipe_from_dict(apply_overrides(read_yaml(path), list(overrides or [])))


def recipe_to_dict(recipe: Recipe) -> dict:
    """Plain nested dict (YAML/JSON/checkpoint friendly); recipe_from_dict inverts it."""
    return dataclasses.asdict(recipe)
