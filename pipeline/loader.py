"""Batches of positive views for SSL training: make_loader(cfg, epoch, rank, world_size, start_step).

Seeding and splitting. A rank's epoch is exactly `steps_per_epoch` batches. With W workers (W = 1
when `workers` is 0) the rank runs W independent virtual streams, and global step i is batch i // W
of stream i % W (DataLoader hands out worker batches round-robin, in order). Each stream is cut into
chunks of `chunk_steps` batches, and chunk c of stream s is generated from scratch by a generator
seeded with (seed, epoch, rank, s, c): it opens random shards at random entry points, crops, shuffles
its own `chunk_steps * batch_size` items and yields its batches. No state crosses a chunk boundary,
so `start_step=k` restarts at the chunk holding step k and replays at most `chunk_steps - 1` batches
per stream: the batches from k on equal a fresh loader's (same workers, batch size and world size).
Every rank and worker reads a different order that changes every epoch, and no rank can run dry:
streams resample shards forever, whatever their number and sizes.

Shuffling. Items (int16 crops) wait in a buffer of `shuffle_buffer`; each draw picks a random item,
retrying a few times when its group is already in the batch, because samples of a group sit together
in a shard and a batch holding two of them gives the contrastive loss a false negative. The rate of
batches that still hold a repeated group is reported in `Loader.stats["dup_group_rate"]`: it stays
low while the buffer holds several times `batch_size` distinct groups. A worker holds about
`shuffle_buffer * sum(views) * 32 kB/s` of crops (128 MB at the defaults with 2 x 2 s views: lower
the buffer for long multi-crop views).

Batches are int16 `[B, T_v]` tensors per view (half the bytes of float on the way to the device),
pinned when CUDA is available; `views_to_device` turns them into float32 in [-1, 1] on the device.
Workers stack them into shared-memory slots allocated once per epoch (pipeline/ring.py), and the
trainer copies each batch out as it arrives: no shared memory is created per batch.
"""
from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.ring import Ring
from pipeline.sources import Corpus, resolve_all
from pipeline.stream import mixed_samples
from pipeline.views import Item, cross_utterance, same_utterance, view_frames
from shards.format import SAMPLE_RATE

log = logging.getLogger(__name__)
MODES = ("same-utterance", "cross-utterance")
COUNTERS = ("shards_opened", "shards_skipped", "samples_read", "samples_skipped", "short_skipped",
            "short_padded", "cross_items", "fallbacks", "batches", "dup_group_batches", "cpu_seconds")
PER_WORKER = ("peak_rss_mb", "peak_private_mb")  # the largest over workers, not sums
_GROUP_TRIES = 8
_PREFETCH = 2  # batches in flight per worker
_PRIVATE_EVERY_S = 30.0  # worker CPU seconds between samples of its private memory


@dataclass
class DataConfig:
    train: str | list[str] = ""  # shard-set prefix (with manifest), brace pattern, or a list of them
    weights: list[float] | None = None  # mixing weights of the sources in `train` (equal if None)
    views: list[float] = field(default_factory=lambda: [2.0, 2.0])  # seconds per view
    mode: str = "same-utterance"  # or "cross-utterance"
    batch_size: int = 256  # per rank
    workers: int = 4
    shuffle_buffer: int = 1024  # items (crops) held per worker
    steps_per_epoch: int = 1000
    min_duration: float = 1.0  # seconds; shorter utterances are skipped, longer ones pad by repetition
    seed: int = 0
    strict: bool = False  # raise on a broken shard instead of skipping it
    storage_options: dict = field(default_factory=dict)
    chunk_steps: int = 16  # batches per independently seeded chunk: the most a resume replays

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"data.mode {self.mode!r}: expected one of {MODES}")
        if not self.views or min(self.views) <= 0:
            raise ValueError(f"data.views {self.views}: need positive durations in seconds")
        for name in ("batch_size", "steps_per_epoch", "shuffle_buffer", "chunk_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0 or self.min_duration <= 0:
            raise ValueError("data.workers must be >= 0 and data.min_duration > 0")


@dataclass
class Batch:
    views: list[torch.Tensor]  # each [B, T_v] int16
    keys: list[str]
    groups: list[str]


def views_to_device(batch: Batch, device: torch.device | str) -> list[torch.Tensor]:
    """float32 views in [-1, 1] on `device` (int16 travels, the conversion runs there)."""
    return [v.to(device, non_blocking=True).float().div_(32768.0) for v in batch.views]


def _pick(buffer: list[Item], taken: set[str], rng: np.random.Generator) -> Item:
    for _ in range(_GROUP_TRIES):
        i = int(rng.integers(len(buffer)))
        if buffer[i].group not in taken:
            break
    buffer[i], buffer[-1] = buffer[-1], buffer[i]
    return buffer.pop()


def _crops(items: list[Item], views: int) -> list[list[np.ndarray]]:
    return [[it.views[v] for it in items] for v in range(views)]


def _chunk(cfg: DataConfig, corpora: list[Corpus], weights: list[float], rng: np.random.Generator,
           stats: Counter) -> Iterator[list[Item]]:
    """The items of the `chunk_steps` batches of one chunk, from a fresh sample stream and shuffle buffer."""
    frames = view_frames(cfg.views)
    samples = mixed_samples(corpora, weights, rng, cfg.storage_options, cfg.strict, stats)
    make_items = same_utterance if cfg.mode == "same-utterance" else cross_utterance
    items = make_items(samples, frames, int(cfg.min_duration * SAMPLE_RATE), rng, stats)
    to_read, buffer = cfg.chunk_steps * cfg.batch_size, []
    try:
        for _ in range(cfg.chunk_steps):
            batch: list[Item] = []
            taken: set[str] = set()
            for _ in range(cfg.batch_size):
                while to_read and len(buffer) < cfg.shuffle_buffer:
                    buffer.append(next(items))
                    to_read -= 1
                batch.append(_pick(buffer, taken, rng))
                taken.add(batch[-1].group)
            stats["batches"] += 1
            stats["dup_group_batches"] += len(taken) < len(batch)
            yield batch
    finally:
        items.close()
        samples.close()


class _Streams(IterableDataset):
    """Each worker yields (views, keys, groups, its stream's stats) for the global steps it serves:
    `views` is a list of `[B, T_v]` tensors in-process, or (worker, slot) of the `ring` in a worker."""

    def __init__(self, cfg: DataConfig, corpora: list[Corpus], weights: list[float], epoch: int,
                 rank: int, start_step: int):
        self.cfg, self.corpora, self.weights = cfg, corpora, weights
        self.epoch, self.rank, self.start_step = epoch, rank, start_step
        self.ring: Ring | None = None  # set by Loader before the workers start

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        first = self.start_step + worker  # this worker serves first, first + W, ...
        stream, count = first % workers, len(range(first, self.cfg.steps_per_epoch, workers))
        chunk, skip = divmod(first // workers, self.cfg.chunk_steps)
        stats: Counter = Counter()
        cpu0, sampled = time.process_time(), -_PRIVATE_EVERY_S
        produced = 0
        while count:
            rng = np.random.default_rng([self.cfg.seed, self.epoch, self.rank, stream, chunk])
            for i, items in enumerate(_chunk(self.cfg, self.corpora, self.weights, rng, stats)):
                if skip:
                    skip -= 1
                    continue
                cpu = time.process_time() - cpu0
                if i == 0 and cpu - sampled >= _PRIVATE_EVERY_S:  # the buffer has just filled up
                    stats["peak_private_mb"], sampled = max(stats["peak_private_mb"], private_mb()), cpu
                crops = _crops(items, len(self.cfg.views))
                if info is None:
                    views = [torch.from_numpy(np.stack(c)) for c in crops]
                else:
                    views = (worker, self.ring.put(worker, produced, crops))
                snapshot = {**stats, "stream": stream, "cpu_seconds": cpu, "peak_rss_mb": peak_rss_mb()}
                yield views, [it.key for it in items], [it.group for it in items], snapshot
                produced += 1
                count -= 1
                if not count:
                    break
            chunk += 1


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), pages shared with its parent included."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def private_mb() -> float:
    """Memory this process alone holds (buffers, crops, clients): what a worker adds. Reading it
    walks the page tables (tens of ms with torch loaded), so workers sample it sparingly."""
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean:", "Private_Dirty:"))) / 1024


def _own_process_group(worker_id: int) -> None:
    """Move a worker out of the trainer's process group. torchrun (and a terminal's Ctrl-C) signal the
    whole group, and DataLoader workers die on SIGTERM; the trainer must outlive that signal to finish
    its step and checkpoint, then shut its workers down itself (they also exit if the trainer dies)."""
    os.setpgid(0, 0)


class Loader:
    """Iterable of exactly `steps_per_epoch - start_step` batches.

    `stats` (also logged at the end of each pass) sums the streams' COUNTERS: shards opened and skipped
    as broken, samples read and skipped, short utterances skipped or padded, cross-utterance items and
    their same-utterance fallbacks, batches and those holding a repeated group, worker CPU seconds;
    with the rates `dup_group_rate` and `fallback_rate` and the per-worker memory peaks.
    """

    def __init__(self, cfg: DataConfig, streams: _Streams, steps: int):
        self.cfg, self.streams, self.steps = cfg, streams, steps
        self.per_stream: dict[int, dict] = {}
        self.context = multiprocessing.get_context()  # one context for the workers and their semaphores

    def __len__(self) -> int:
        return self.steps

    def _ring(self) -> Ring | None:
        if self.cfg.workers == 0:
            return None
        return Ring(self.cfg.workers, _PREFETCH + 1, self.cfg.batch_size, view_frames(self.cfg.views), self.context)

    def __iter__(self) -> Iterator[Batch]:
        pin = torch.cuda.is_available()
        ring = self.streams.ring = self._ring()
        if ring is None:
            source = iter(self.streams)
        else:
            # Streams seed themselves; a private generator keeps DataLoader's base-seed draw off the
            # trainer's global RNG, so a run resumed mid-epoch draws what an uninterrupted one does.
            loader = DataLoader(self.streams, batch_size=None, num_workers=self.cfg.workers,
                                prefetch_factor=_PREFETCH, worker_init_fn=_own_process_group,
                                multiprocessing_context=self.context, generator=torch.Generator().manual_seed(0))
            gc.freeze()  # a worker's collections would otherwise touch, and so copy, every inherited object
            try:
                source = iter(loader)
            finally:
                gc.unfreeze()
        self.per_stream = {}
        produced = 0
        for views, keys, groups, stats in source:
            self.per_stream[stats["stream"]] = stats
            produced += 1
            if ring is not None:
                views = ring.take(*views, pin)
            elif pin:
                views = [v.pin_memory() for v in views]
            yield Batch(views, keys, groups)
        if produced != self.steps:
            raise RuntimeError(f"loader produced {produced} batches, expected {self.steps}")
        log.info("pipeline epoch %d rank %d: %s", self.streams.epoch, self.streams.rank, self.stats)

    @property
    def stats(self) -> dict:
        """Counters summed over streams, with the rates the trainer logs."""
        total: Counter = Counter()
        for s in self.per_stream.values():
            total.update({k: v for k, v in s.items() if k in COUNTERS})
        out = {k: total[k] for k in COUNTERS}
        out.update({k: max((s.get(k, 0.0) for s in self.per_stream.values()), default=0.0) for k in PER_WORKER})
        out["dup_group_rate"] = total["dup_group_batches"] / max(1, total["batches"])
        out["fallback_rate"] = total["fallbacks"] / max(1, total["cross_items"])
        return out


def make_loader(cfg: DataConfig, epoch: int, rank: int, world_size: int, start_step: int = 0) -> Loader:
    """The batches of one rank's epoch; `start_step` resumes mid-epoch (see the module docstring)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    if not 0 <= start_step <= cfg.steps_per_epoch:
        raise ValueError(f"start_step {start_step} outside the epoch's {cfg.steps_per_epoch} steps")
    corpora, weights = resolve_all(cfg.train, cfg.weights, cfg.storage_options)
    streams = _Streams(cfg, corpora, weights, epoch, rank, start_step)
    return Loader(cfg, streams, cfg.steps_per_epoch - start_step)
