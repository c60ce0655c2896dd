"""Checkpoints: one torch.save dict, written atomically to a local path or any fsspec URL.

Layout (format 1), as the trainer writes it:
    format      1
    recipe      the whole recipe as a plain dict (recipe_to_dict), its secrets redacted (storage.redact);
                load_method rebuilds the method from it, and readers take storage options from their caller
    method      SSLMethod.state_dict(), unwrapped from DDP: encoder, heads, EMA teachers, queues
    optimizer   the optimizer's state_dict()
    step        optimizer steps done; the data stream's position and the LR/WD schedules follow from it
    world_size  the number of ranks that wrote it
    ranks       per rank: {"step", "rng": {"torch", "numpy", "python", "augment", and "cuda" on CUDA}};
                on another number of ranks, the ranks the checkpoint lacks start from their own seeds
    draw        0, or the step at which the epoch in progress was resumed on another number of ranks:
                the seed of its remaining streams (pipeline/batches.py); absent in older checkpoints

Files in a run's out_dir: `ckpt-<step:08d>.pt` every train.ckpt_every steps (the last K kept) and
`last.pt` when training completes. `last.pt`, when present, is always the newest: a run resumed
to train further removes it with its first new checkpoint. The trainer writes no checkpoint whose
weights or buffers hold NaN or inf (`first_nonfinite`).
"""
from __future__ import annotations

import io
import re

import torch
from torch import nn

from voxstream.model.methods import SSLMethod, build_method
from voxstream.model.recipe import Recipe, RecipeError, recipe_from_dict
from voxstream.shards import storage

CHECKPOINT_FORMAT = 1
LAST = "last.pt"
_PERIODIC = re.compile(r"ckpt-(\d{8})\.pt$")


def save_checkpoint(ckpt: dict, out_dir: str, final: bool = False, keep_last: int = 3,
                    storage_options: dict | None = None) -> str:
    """Write `ckpt` (with "step") atomically as ckpt-<step>.pt, or last.pt when `final`; return its URL.

    Older periodic checkpoints beyond `keep_last` (0 keeps all) go only after the new one is complete.
    The recipe it carries is written with its secrets (storage options' keys, tokens) redacted.
    """
    url = storage.join(out_dir, LAST if final else f"ckpt-{ckpt['step']:08d}.pt")
    buf = io.BytesIO()
    if "recipe" in ckpt:
        ckpt = {**ckpt, "recipe": storage.redact(ckpt["recipe"])}
    torch.save({**ckpt, "format": CHECKPOINT_FORMAT}, buf)
    with storage.open_atomic(url, storage_options) as f:
        f.write(buf.getbuffer())
    if not final:
        names = _names(out_dir, storage_options)
        periodic = sorted(n for n in names if _PERIODIC.match(n))
        stale = (periodic[:-keep_last] if keep_last > 0 else []) + ([LAST] if LAST in names else [])
        for name in stale:
            fs, path = storage.filesystem(storage.join(out_dir, name), storage_options)
            fs.rm(path)
    return url


def _names(out_dir: str, storage_options: dict | None) -> list[str]:
    """File names in out_dir, listed afresh; [] when it does not exist."""
    fs, path = storage.filesystem(out_dir, storage_options)
    fs.invalidate_cache(path)  # object-store listings are cached per filesystem instance
    try:
        return [n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []


class CheckpointError(ValueError):
    """A file that is not a readable voxstream checkpoint (truncated, another format); one line naming it."""


def checkpoints(out_dir: str, storage_options: dict | None = None) -> list[str]:
    """URLs of the checkpoints in out_dir, newest first (last.pt first when training completed)."""
    names = _names(out_dir, storage_options)
    periodic = sorted((n for n in names if _PERIODIC.match(n)), reverse=True)
    return [storage.join(out_dir, n) for n in ([LAST] if LAST in names else []) + periodic]


def latest_checkpoint(out_dir: str, storage_options: dict | None = None) -> str | None:
    """URL of the newest checkpoint in out_dir (last.pt if training completed), or None."""
    return next(iter(checkpoints(out_dir, storage_options)), None)


def read_checkpoint(url: str, storage_options: dict | None = None) -> dict:
    """The checkpoint dict at `url`; a file that is not one (truncated, another format) is a CheckpointError."""
    try:
        data = storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: checkpoint not found") from None
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as e:  # a cut zip, a pickle of something else, text: torch raises any of a dozen types
        reason = (str(e).splitlines() or [""])[0]
        raise CheckpointError(f"{url}: not a readable checkpoint ({type(e).__name__}: {reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{url}: not a voxstream checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def first_nonfinite(state: dict) -> str | None:
    """The name of the first floating-point tensor of a state dict holding NaN or inf, else None.
    One read of the device for the whole dict; the name is searched only when there is one."""
    floats = {k: v for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}
    if not floats or bool(torch.stack([v.isfinite().all() for v in floats.values()]).all()):
        return None
    return next(k for k, v in floats.items() if not bool(v.isfinite().all()))


def load_weights(module: nn.Module, state: dict, source: str) -> None:
    """`module.load_state_dict(state)`; weights of another network are one RecipeError line naming
    `source` and the first difference (torch's message lists every tensor)."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise RecipeError(f"{source} holds another network than model: {lines[1 if len(lines) > 1 else 0]}") from None


def load_method(url: str, storage_options: dict | None = None, trained: bool = True) -> tuple[SSLMethod, Recipe]:
    """(method, recipe) rebuilt from the recipe the checkpoint carries, in eval mode: with its trained
    weights, or with `trained=False` at initialisation (the global torch seed's draw)."""
    ckpt = read_checkpoint(url, storage_options)
    try:
        recipe = recipe_from_dict(ckpt.get("recipe"))
    except RecipeError as e:
        raise RecipeError(f"{url}: the checkpoint's recipe does not validate: {e}") from None
    method = build_method(recipe.model, recipe.method)
    if trained:
        load_weights(method, ckpt["method"], url)
    return method.eval(), recipe
