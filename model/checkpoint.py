"""Checkpoints: one torch.save dict, written atomically to a local path or any fsspec URL.

Layout (format 1): {"format": 1, "recipe": plain dict of the recipe (sections data, augment, model,
method, optim, train), "method": SSLMethod.state_dict() (unwrapped from DDP), "step": int, ...
training state added by the trainer (optimizer, scaler, schedules, RNG, stream position)}.
"""
from __future__ import annotations

import io

import torch

from shards import storage

CHECKPOINT_FORMAT = 1


def read_checkpoint(url: str, storage_options: dict | None = None) -> dict:
    try:
        data = storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: checkpoint not found") from None
    ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{url}: not a voxstream checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def load_method(url: str, storage_options: dict | None = None):
    """(method with trained weights, recipe dict): what evaluation needs from a checkpoint."""
    from model.encoders import EncoderConfig
    from model.methods import build_method, method_config

    ckpt = read_checkpoint(url, storage_options)
    recipe = ckpt["recipe"]
    method = build_method(EncoderConfig(**recipe["model"]), method_config(recipe["method"]))
    method.load_state_dict(ckpt["method"])
    return method.eval(), recipe
