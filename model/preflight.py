"""What a training run checks and prepares before its first step, each failure one line naming its
key: the outputs can be written, the classes fit the labels, the checkpoint to resume from is intact,
the batch of a resume on another number of ranks, the encoder to fine-tune from holds the right
network, SSPS can index the training set."""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Iterator

import torch
from torch import nn

from voxstream.model import distributed
from voxstream.model.checkpoint import CheckpointError, checkpoints, first_nonfinite, load_method, load_weights, \
    read_checkpoint
from voxstream.model.encoders import build_encoder
from voxstream.model.methods import METHODS
from voxstream.model.recipe import Recipe, RecipeError
from voxstream.model.ssps import SSPS
from voxstream.pipeline.loader import Loader
from voxstream.pipeline.sources import index_size
from voxstream.shards import storage
from voxstream.shards.labels import read_labels


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, nothing to resume); the message is one line."""


@contextlib.contextmanager
def storage_errors(key: str) -> Iterator[None]:
    """Any failure to reach a recipe's URLs as one line naming its key (botocore's errors are not OSError)."""
    try:
        yield
    except (RecipeError, TrainingError):
        raise
    except Exception as e:
        raise TrainingError(f"{key}: {type(e).__name__}: {e}") from e


def check_outputs(recipe: Recipe) -> None:
    """Fail before any training if the run could not write its results."""
    cfg = recipe.train
    if cfg.tensorboard and not storage.is_local(cfg.out_dir):
        raise RecipeError(f"train.tensorboard: needs a local train.out_dir, got {cfg.out_dir}")
    if cfg.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise RecipeError("train.tensorboard: the tensorboard package is not installed") from None
    fs, path = storage.filesystem(cfg.out_dir, cfg.storage_options)
    bucket = path.split("/", 1)[0]
    if not storage.is_local(cfg.out_dir) and not cfg.create_bucket and not fs.exists(bucket):
        raise RecipeError(f"train.out_dir: bucket {bucket} does not exist in {cfg.out_dir}; "
                          "create it, or set train.create_bucket=true")
    fs.makedirs(path, exist_ok=True)


def check_classes(recipe: Recipe) -> None:
    """A method over classes (AAM) needs data.labels, with every label below method.classes."""
    classes = getattr(recipe.method, "classes", None)
    if classes is None:
        return
    if not recipe.data.labels:
        raise RecipeError(f"method.name: {recipe.method.name} trains on classes: set data.labels to a labels file")
    labels = read_labels(recipe.data.labels, recipe.data.storage_options).labels
    if labels.size and int(labels.max()) >= classes:
        raise RecipeError(f"method.classes: {classes}, but {recipe.data.labels} has labels up to {int(labels.max())}")


def find_resume(recipe: Recipe, resume: bool | str) -> tuple[str | None, dict | None]:
    """(URL, contents) of the checkpoint to start from, or (None, None): the one named (unreadable: an error),
    else the newest intact one in out_dir. A newer one that is cut short (a preempted write) or holds
    NaN/inf weights is skipped with a line saying why; out_dir with checkpoints but none intact is an error."""
    cfg = recipe.train
    if isinstance(resume, str):
        return resume, read_intact(resume, cfg.storage_options)
    skipped = None
    for url in checkpoints(cfg.out_dir, cfg.storage_options):
        try:
            return url, read_intact(url, cfg.storage_options)
        except CheckpointError as e:
            skipped = e
            if distributed.rank() == 0:
                print(f"skipping {e}; trying the previous checkpoint", file=sys.stderr)
    if skipped:
        raise TrainingError(f"train.out_dir: no intact checkpoint in {cfg.out_dir}, the oldest: {skipped}")
    if resume:
        raise TrainingError(f"--resume: no checkpoint in {cfg.out_dir}")
    return None, None


def read_intact(url: str, storage_options: dict) -> dict:
    """read_checkpoint; NaN/inf weights or buffers (written before the trainer refused them) are a CheckpointError."""
    ckpt = read_checkpoint(url, storage_options)
    bad = first_nonfinite(ckpt.get("method", {}))
    if bad:
        raise CheckpointError(f"{url}: {bad} is not finite")
    return ckpt


def rescale_batch(recipe: Recipe, ckpt: dict, world: int) -> Recipe:
    """The recipe a checkpoint of another world size resumes with: the checkpoint's global batch kept,
    each rank taking its share, where the new number of ranks divides it; otherwise the recipe's per-rank
    batch, and the global batch changes. Rank 0 says which in one line."""
    was, per_rank = ckpt["world_size"], recipe.data.batch_size
    total = ckpt["recipe"]["data"]["batch_size"] * was
    if total % world == 0:
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, batch_size=total // world))
        change = f"global batch {total} kept, {total // world} per rank"
    else:
        change = (f"global batch {total} does not divide by {world}, so it becomes {per_rank * world} "
                  f"({per_rank} per rank): the learning rate is not rescaled, and the in-batch negatives and "
                  f"batch statistics change with it")
    fresh = "; the epoch's remaining steps stream fresh draws" if ckpt["step"] % recipe.data.steps_per_epoch else ""
    if distributed.rank() == 0:
        print(f"resuming on {world} rank(s) from {was}: {change}{fresh}", file=sys.stderr)
    return recipe


def initial_encoder(recipe: Recipe) -> nn.Module:
    """train.init: an encoder holding that checkpoint's evaluation network (DINO's teacher, else its encoder),
    so a pseudo-label round fine-tunes the model that made its labels."""
    source, _ = load_method(recipe.train.init, recipe.train.storage_options)
    encoder = build_encoder(recipe.model)
    load_weights(encoder, source.embedder().state_dict(), f"train.init: {recipe.train.init}")
    return encoder


def build_ssps(recipe: Recipe, loader: Loader, total_steps: int, device: torch.device) -> SSPS | None:
    """SSPS's queues over every utterance of data.train (recipe.ssps), or None when it is off."""
    cfg = recipe.ssps
    if not cfg.enabled:
        return None
    if not METHODS[recipe.method.name].SAMPLES_POSITIVES:
        raise RecipeError(f"ssps.enabled: {recipe.method.name} has no positive branch to sample; "
                          f"SSPS works with {', '.join(n for n, m in METHODS.items() if m.SAMPLES_POSITIVES)}")
    utterances = index_size(loader.plan.corpora)
    if utterances is None:
        raise RecipeError(f"ssps.enabled: data.train must be shard sets with a manifest (SSPS indexes every "
                          f"utterance by its shard and position), got {recipe.data.train}")
    return SSPS(cfg, utterances, recipe.model.embed_dim, recipe.data.steps_per_epoch, total_steps, device)
