"""A stream's batches of positive views: the data settings, seeding, chunks and the shuffle buffer.

Nothing here imports torch: this is the code that runs in the lean worker processes
(pipeline/workers.py), and in the trainer itself when `workers` is 0.

Seeding and splitting. A rank's epoch is exactly `steps_per_epoch` batches. With W workers (W = 1
when `workers` is 0) the rank runs W independent streams, and global step i is batch i // W of
stream i % W. Each stream is cut into chunks of `chunk_steps` batches, and chunk c of stream s is
generated from scratch by a generator seeded with (seed, epoch, rank, s, c): it opens random shards
at random entry points, crops, shuffles its own `chunk_steps * batch_size` items and yields its
batches. No state crosses a chunk boundary, so `start_step=k` restarts at the chunk holding step k
and replays at most `chunk_steps - 1` batches per stream: the batches from k on equal a fresh
loader's (same workers, batch size and world size). Every rank and worker reads a different order
that changes every epoch, and no rank can run dry: streams resample shards forever, whatever their
number and sizes. A `draw` > 0 adds itself to every seed: the trainer sets it when a run resumes
mid-epoch on another number of ranks, whose streams could not skip what the old ranks read, so the
epoch's remaining steps come from fresh draws instead.

Items. Each item holds its crops (one per view), its key, group, label, global index and speaker
(pipeline/views.py), and, when the plan asks for `reference_seconds` (SSPS), one more clean crop of
its own utterance, drawn from the chunk's generator like the others, so a resume replays it too.

CPU augmentation (`augment.cpu`, pipeline/cpu_augment.py) runs on each delivered batch's crops,
every item seeded from a child of its chunk's generator: batches stay a function of the chunk's
seed, a resume gives the same augmented batches, and the crops it starts from are those without it.
It runs on the views only: the reference crop stays clean.

Shuffling. Items (int16 crops) wait in a buffer of `shuffle_buffer`; each draw picks a random item,
retrying a few times when its group is already in the batch, because samples of a group sit together
in a shard and a batch holding two of them gives the contrastive loss a false negative. The rate of
batches that still hold a repeated group is reported as `dup_group_rate`: it stays low while the
buffer holds several times `batch_size` distinct groups. A worker holds about
`shuffle_buffer * sum(views) * 32 kB/s` of crops (128 MB at the defaults with 2 x 2 s views: lower
the buffer for long multi-crop views).
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from voxstream.pipeline.cpu_augment import augment_items, build_compose
from voxstream.pipeline.sources import Corpus
from voxstream.pipeline.stats import StreamStats
from voxstream.pipeline.stream import mixed_samples
from voxstream.pipeline.views import TrainingItem, cross_utterance, same_utterance, view_frames
from voxstream.shards.format import SAMPLE_RATE
from voxstream.shards.labels import Labels, read_labels
from voxstream.shards import storage
from voxstream.shards.cache import ShardCache
from voxstream.shards.storage import Retry

MODES = ("same-utterance", "cross-utterance")
_GROUP_TRIES = 8
_SMAPS_EVERY_S = 30.0  # stream CPU seconds between samples of its proportional and private memory


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
    retry_attempts: int = Retry.attempts  # tries per shard open or read before the shard is skipped (storage.Retry)
    retry_backoff: float = Retry.backoff  # s before the first retry, doubling; the defaults outwait a 1-min S3 restart
    labels: str = ""  # labels file (shards/labels.py): its labels become the groups; unlabeled utterances are skipped
    cache_dir: str = ""  # a local folder all ranks and workers of a node share as a shard cache (shards/cache.py);
                         # "" reads every shard from storage each time
    cache_gb: float = 100.0  # the most the cache holds (GB, 1e9 bytes); least recently used shards go first

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
        if self.retry_attempts < 1 or self.retry_backoff < 0:
            raise ValueError("data.retry_attempts must be >= 1 and data.retry_backoff >= 0")
        if self.cache_dir and not storage.is_local(self.cache_dir):
            raise ValueError(f"data.cache_dir {self.cache_dir!r}: must be a local folder (it is the node's cache)")
        if not self.cache_gb > 0:
            raise ValueError(f"data.cache_gb must be > 0, got {self.cache_gb}")

    @property
    def retry(self) -> Retry:
        return Retry(self.retry_attempts, self.retry_backoff)

    @property
    def shard_cache(self) -> ShardCache | None:
        if not self.cache_dir:
            return None
        return ShardCache(os.path.abspath(storage.filesystem(self.cache_dir)[1]), int(self.cache_gb * 1e9))


@dataclass
class Plan:
    """Everything one stream needs (sent to a worker process)."""
    cfg: DataConfig
    corpora: list[Corpus]
    weights: list[float]
    epoch: int
    rank: int
    start_step: int
    cpu_augment: list[dict] = field(default_factory=list)  # prepared augment.cpu entries (pipeline/cpu_augment.py)
    reference_seconds: float = 0.0  # > 0: each item also gets a clean crop this long of its own utterance (SSPS)
    draw: int = 0  # > 0: the epoch's streams are seeded afresh with it (a resume on another world size)

    @property
    def reference_frames(self) -> int:
        return view_frames([self.reference_seconds])[0] if self.reference_seconds > 0 else 0

    @property
    def frames(self) -> list[int]:
        """Samples per view of its batches: the views', then the reference crop's when there is one."""
        return view_frames(self.cfg.views) + ([self.reference_frames] if self.reference_frames else [])


def _pick(buffer: list[TrainingItem], taken: set[str], rng: np.random.Generator) -> TrainingItem:
    for _ in range(_GROUP_TRIES):
        i = int(rng.integers(len(buffer)))
        if buffer[i].group not in taken:
            break
    buffer[i], buffer[-1] = buffer[-1], buffer[i]
    return buffer.pop()


def _chunk(cfg: DataConfig, corpora: list[Corpus], weights: list[float], labels: Labels | None, reference: int,
           rng: np.random.Generator, stats: StreamStats) -> Iterator[list[TrainingItem]]:
    """The items of the `chunk_steps` batches of one chunk, from a fresh sample stream and shuffle buffer."""
    frames = view_frames(cfg.views)
    samples = mixed_samples(corpora, weights, rng, cfg.storage_options, cfg.strict, stats, cfg.retry, cfg.shard_cache)
    make_items = same_utterance if cfg.mode == "same-utterance" else cross_utterance
    items = make_items(samples, frames, int(cfg.min_duration * SAMPLE_RATE), labels, rng, stats, reference)
    to_read, buffer = cfg.chunk_steps * cfg.batch_size, []
    try:
        for _ in range(cfg.chunk_steps):
            batch: list[TrainingItem] = []
            taken: set[str] = set()
            for _ in range(cfg.batch_size):
                while to_read and len(buffer) < cfg.shuffle_buffer:
                    buffer.append(next(items))
                    to_read -= 1
                batch.append(_pick(buffer, taken, rng))
                taken.add(batch[-1].group)
            stats.batches += 1
            stats.pairs += len(batch)
            stats.dup_group_batches += len(taken) < len(batch)
            yield batch
    finally:
        items.close()
        samples.close()


def stream_batches(plan: Plan, worker: int, workers: int) -> Iterator[tuple[list[TrainingItem], StreamStats]]:
    """(items, a copy of the stream's stats so far) for each global step that `worker` of `workers`
    serves: steps start_step + worker, + workers, ... up to the end of the epoch."""
    cfg = plan.cfg
    first = plan.start_step + worker
    stream, count = first % workers, len(range(first, cfg.steps_per_epoch, workers))
    chunk, skip = divmod(first // workers, cfg.chunk_steps)
    stats = StreamStats()
    compose = build_compose(plan.cpu_augment)  # None without CPU augmentation: no per-item work
    labels = read_labels(cfg.labels, cfg.storage_options) if cfg.labels else None  # hashes and labels only
    cpu0, sampled = time.process_time(), -_SMAPS_EVERY_S
    while count:
        seed = [cfg.seed, plan.epoch, plan.rank, stream, chunk] + ([plan.draw] if plan.draw else [])
        rng = np.random.default_rng(seed)
        augment_seeds = rng.spawn(1)[0]  # a child generator: the crops stay those drawn without augmentation
        for i, items in enumerate(_chunk(cfg, plan.corpora, plan.weights, labels, plan.reference_frames, rng, stats)):
            seeds = augment_seeds.integers(2**32, size=len(items))  # skipped batches draw too: resume replays them
            if skip:
                skip -= 1
                continue
            if compose is not None:
                augment_items(compose, items, seeds)
            cpu = time.process_time() - cpu0
            if i == 0 and cpu - sampled >= _SMAPS_EVERY_S:  # the buffer has just filled up
                pss, private = smaps_mb()
                stats.peak_pss_mb = max(stats.peak_pss_mb, pss)
                stats.peak_private_mb = max(stats.peak_private_mb, private)
                sampled = cpu
            stats.cpu_seconds, stats.peak_rss_mb = cpu, peak_rss_mb()
            yield items, copy.copy(stats)
            count -= 1
            if not count:
                return
        chunk += 1


def by_view(items: list[TrainingItem], views: int) -> list[list[np.ndarray]]:
    """The crops of a batch's items, view by view, their reference crops last when they have them."""
    rows = [[it.views[v] for it in items] for v in range(views)]
    return rows + [[it.reference for it in items]] if items[0].reference is not None else rows


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), pages shared with other processes included."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def smaps_mb() -> tuple[float, float]:
    """(proportional, private) memory of this process: PSS splits each shared page among the processes
    that map it, private is what this process alone holds. Reading them walks the page tables (tens
    of ms in a large process), so streams sample them sparingly."""
    with open("/proc/self/smaps_rollup") as f:
        fields = {line.split(":")[0]: int(line.split()[1]) for line in f if line.endswith("kB\n")}
    return fields["Pss"] / 1024, (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024
