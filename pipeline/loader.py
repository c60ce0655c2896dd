"""Batches of positive views for SSL training: make_loader(cfg, epoch, rank, world_size, start_step, cpu_augment,
reference_seconds).

How a rank's steps are split into seeded streams and chunks, and how the shuffle buffer works, is in
pipeline/batches.py; the worker processes that run the streams are in pipeline/workers.py.

Batches are int16 `[B, T_v]` tensors per view (half the bytes of float on the way to the device),
the clean reference view last when `reference_seconds` > 0 (SSPS), pinned when CUDA is available;
`views_to_device` turns them into float32 in [-1, 1] on the device. Each batch also lists its items'
keys, groups, labels, global indices (pipeline/sources.py) and speakers.
Workers stack them into shared slots mapped once per pass (pipeline/ring.py), and the trainer copies
each batch out as it arrives (into pinned memory on CUDA, where a copy was needed anyway).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from voxstream.pipeline.batches import DataConfig, Plan, by_view, stream_batches
from voxstream.pipeline.sources import Corpus, resolve_all
from voxstream.pipeline.stats import StreamStats, summary
from voxstream.pipeline.workers import Workers
from voxstream.shards.labels import read_labels, stable_hash

__all__ = ["Batch", "DataConfig", "Loader", "group_ids", "make_loader", "views_to_device"]
log = logging.getLogger(__name__)
_SLOTS = 2  # batches a worker may have ready before the trainer takes one


@dataclass
class Batch:
    views: list[torch.Tensor]  # each [B, T_v] int16; the reference view last when asked for
    keys: list[str]
    groups: list[str]
    labels: list[int] | None = None  # the items' (pseudo-)speakers when data.labels is set
    indices: list[int] = field(default_factory=list)  # global indices (pipeline/sources.py), -1 where unknown
    speakers: list[str] = field(default_factory=list)  # from the metadata, "" where unknown: monitoring only


def views_to_device(batch: Batch, device: torch.device | str) -> list[torch.Tensor]:
    """float32 views in [-1, 1] on `device` (int16 travels, the conversion runs there)."""
    return [v.to(device, non_blocking=True).float().div_(32768.0) for v in batch.views]


def group_ids(batch: Batch, device: torch.device | str) -> torch.Tensor:
    """int64 [B] ids of the items' groups on `device`, equal on every rank: the labels themselves with
    data.labels (AAM's classes), else a stable hash of the group name (not Python's per-process one).
    Methods with negatives leave pairs of one group out of them, since a shuffle buffer cannot keep
    every batch free of repeated groups."""
    ids = batch.labels if batch.labels is not None else [stable_hash(g) for g in batch.groups]
    return torch.tensor(ids, dtype=torch.int64).to(device, non_blocking=True)


def _tensor(rows: np.ndarray | list[np.ndarray], pin: bool) -> torch.Tensor:
    """Equal-length int16 rows (crops, or a batch slot) copied into a fresh tensor, pinned when `pin`."""
    out = torch.empty((len(rows), len(rows[0])), dtype=torch.int16, pin_memory=pin)
    np.stack(rows, out=out.numpy())
    return out


class Loader:
    """Iterable of exactly `steps_per_epoch - start_step` batches.

    `stats` (also logged at the end of each pass) sums the streams' counters (pipeline/stats.py says
    what each means), with the rates `dup_group_rate` and `fallback_rate` and the per-worker memory
    peaks (RSS, PSS and private MB; the trainer's own without workers).
    """

    def __init__(self, plan: Plan, steps: int):
        self.plan, self.steps = plan, steps
        self.per_stream: dict[int, StreamStats] = {}  # by worker: each runs one stream

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Batch]:
        cfg, pin = self.plan.cfg, torch.cuda.is_available()
        self.per_stream = {}
        if cfg.workers == 0:
            for items, stats in stream_batches(self.plan, 0, 1):
                self.per_stream[0] = stats
                views = [_tensor(rows, pin) for rows in by_view(items, len(cfg.views))]
                yield Batch(views, [it.key for it in items], [it.group for it in items],
                            [it.label for it in items] if cfg.labels else None,
                            [it.index for it in items], [it.speaker for it in items])
        else:
            workers = Workers(self.plan, cfg.workers, _SLOTS)
            try:
                for step in range(self.steps):
                    ready = workers.receive(step)
                    self.per_stream[ready.worker] = ready.stats
                    views = [_tensor(v, pin) for v in workers.ring.get(ready.worker, ready.slot)]
                    workers.free(ready.worker)
                    yield Batch(views, ready.keys, ready.groups, ready.labels if cfg.labels else None,
                                ready.indices, ready.speakers)
            finally:
                workers.close()
        log.info("pipeline epoch %d rank %d: %s", self.plan.epoch, self.plan.rank, self.stats)

    @property
    def stats(self) -> dict:
        """Counters summed over streams, with the rates the trainer logs."""
        return summary(self.per_stream[w] for w in sorted(self.per_stream))


def make_loader(cfg: DataConfig, epoch: int, rank: int, world_size: int, start_step: int = 0,
                cpu_augment: list[dict] | None = None, reference_seconds: float = 0.0, draw: int = 0) -> Loader:
    """The batches of one rank's epoch; `start_step` resumes mid-epoch, `draw` > 0 seeds its streams
    afresh (see pipeline/batches.py).
    `cpu_augment`: the recipe's `augment.cpu` as `prepare_cpu_augment` returns it (its shard sets
    already copied to local folders), run on every view's crop in the streams (pipeline/cpu_augment.py).
    `reference_seconds` > 0: every item gets one more view, that long, cropped from its own utterance
    and never augmented, last in Batch.views (SSPS's reference crop)."""
    if reference_seconds < 0:
        raise ValueError(f"reference_seconds {reference_seconds}: must be >= 0")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    if not 0 <= start_step <= cfg.steps_per_epoch:
        raise ValueError(f"start_step {start_step} outside the epoch's {cfg.steps_per_epoch} steps")
    corpora, weights = resolve_all(cfg.train, cfg.weights, cfg.storage_options)
    if cfg.labels:
        check_labels(cfg.labels, corpora, cfg.storage_options)
    plan = Plan(cfg, corpora, weights, epoch, rank, start_step, list(cpu_augment or []), reference_seconds, draw)
    return Loader(plan, cfg.steps_per_epoch - start_step)


def check_labels(url: str, corpora: list[Corpus], storage_options: dict | None = None) -> None:
    """A labels file must describe one of the training sets: the shards it was made from (its
    info's `set`) are those of one corpus, by name and checksum."""
    made_from = read_labels(url, storage_options).info.get("set")
    if made_from is None:
        return  # made by hand: trusted
    wanted = sorted((s["name"], s.get("sha256")) for s in made_from)
    for corpus in corpora:
        if sorted((s.url.rsplit("/", 1)[-1], s.sha256) for s in corpus.shards) == wanted:
            return
    raise ValueError(f"data.labels {url}: made for another shard set ({len(wanted)} shards, first "
                     f"{wanted[0][0] if wanted else 'none'}), not for any of data.train")
