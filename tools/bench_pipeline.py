"""Pipeline benchmark: two-crop pairs per worker core and peak memory per worker, shards vs per-file.

Both loaders run in the same process with the same crops (2 x 2 s by default) and worker count: the
pipeline (pipeline.loader.make_loader on tar shards) and a simple baseline, a map-style DataLoader that
reads one file (or one S3 object) per utterance and seek-decodes the same crops with
shards.format.decode_audio. "Per core" divides pairs by the CPU seconds the workers used (user +
system, from getrusage of the reaped workers), so the figure holds on a busy machine; wall-clock
pairs/s are reported beside it. S3 is a SeaweedFS server on loopback (shards.locals3).

Without --shards it writes its own data: speech-like synthetic utterances (harmonic voiced segments
with a wandering pitch, syllable envelopes, pauses and a little noise) of 2-10 s.
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from pipeline.loader import DataConfig, make_loader, peak_rss_mb, private_mb
from pipeline.sources import open_shard
from shards import storage
from shards.format import (MANIFEST, SAMPLE_RATE, Manifest, audio_frames, build_shard, decode_audio, encode_flac, iter_samples,
                           sample_key, shard_name, shard_urls, write_manifest)
from shards.locals3 import local_s3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", help="shard-set URL to read instead of generated data")
    parser.add_argument("--utterances", type=int, default=300, help="generated utterances")
    parser.add_argument("--seconds", type=float, nargs=2, default=[2.0, 10.0], help="generated lengths")
    parser.add_argument("--views", type=float, nargs="+", default=[2.0, 2.0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=128,
                        help="batches per measurement, rounded up to whole chunks of every worker")
    parser.add_argument("--shuffle-buffer", type=int, default=1024)
    parser.add_argument("--no-s3", action="store_true", help="local shards only")
    parser.add_argument("--seed", type=int, default=0)


def speechlike(rng: np.random.Generator, n: int) -> np.ndarray:
    """Voiced syllables on a wandering pitch, with pauses and a noise floor; float in [-1, 1]."""
    t = np.arange(n) / SAMPLE_RATE
    f0 = rng.uniform(90, 220) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t + rng.uniform(0, 6)))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voiced = sum(np.sin(k * phase) * rng.uniform(0.3, 1.0) / k for k in range(1, 9))
    syllables = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6)), 0, None) ** 2
    pauses = np.repeat(rng.random(n // 8000 + 1) > 0.2, 8000)[:n]
    wave = 0.25 * voiced * syllables * pauses + 0.005 * rng.standard_normal(n)
    return np.clip(wave, -1, 1)


def generate(root: Path, count: int, seconds: tuple[float, float], seed: int, per_shard: int = 40) -> str:
    """Shards of `count` speech-like utterances (groups of 1-6) under root/shards; returns the URL."""
    rng = np.random.default_rng(seed)
    samples, shards, group, left = [], [], 0, 0
    for u in range(count):
        if left == 0:
            group, left = group + 1, int(rng.integers(1, 7))
        left -= 1
        n = int(rng.uniform(*seconds) * SAMPLE_RATE)
        key = sample_key("bench", f"spk{group}", f"g{group}", f"u{u}")
        meta = {"utt": f"u{u}", "corpus": "bench", "speaker": f"spk{group}", "session": f"g{group}",
                "group": f"g{group}", "duration": n / SAMPLE_RATE, "num_samples": n,
                "sample_rate": SAMPLE_RATE, "source": "synthetic"}
        samples.append((key, meta, encode_flac(speechlike(rng, n))))
        if (len(samples) >= per_shard and left == 0) or u == count - 1:
            data, stats = build_shard(samples, shard_name("bench", len(shards)))
            storage.write_bytes(str(root / "shards" / stats.name), data)
            shards.append(vars(stats))
            samples = []
    url = str(root / "shards")
    write_manifest(url, Manifest(corpus="bench", prefix="bench", shards=shards))
    return url


def extract_files(shards: str, root: Path) -> list[str]:
    """One FLAC file per utterance of a shard set, for the baseline."""
    paths = []
    for url in shard_urls(shards):
        for key, _, flac in iter_samples(url):
            path = root / "files" / (key.replace("/", "__") + ".flac")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(flac)
            paths.append(str(path))
    return paths


class PerFile(Dataset):
    """The baseline: one file or object per utterance, the same random crops, decode_audio per crop."""

    def __init__(self, urls: list[str], frames: list[int], storage_options: dict | None):
        self.urls, self.frames, self.options = urls, frames, storage_options
        self.calls, self.memory = 0, torch.zeros(2)  # per worker process: peak RSS, peak private

    def __len__(self) -> int:
        return len(self.urls)

    def __getitem__(self, i: int):
        with open_shard(self.urls[i], self.options) as f:  # per-process filesystem, as the pipeline
            data = f.read()
        rng, length, crops = np.random.default_rng(), audio_frames(data), []
        for frames in self.frames:
            start = int(rng.integers(max(1, length - frames + 1)))
            wave = decode_audio(data, start, frames)
            crops.append(torch.from_numpy(np.resize(wave, frames)))  # short: repeat, as the pipeline
        self.calls += 1
        if self.calls % 32 == 0:  # sampled, as the pipeline's workers do: reading smaps is costly
            private = private_mb() if self.calls % 1024 == 64 else 0.0
            self.memory = torch.maximum(self.memory, torch.tensor([peak_rss_mb(), private]))
        return (*crops, self.memory)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _measure(batches, count: int) -> tuple[float, float, list]:
    """(wall seconds after the first batch, worker CPU seconds, last batch) for `count` batches."""
    cpu0 = _children_cpu()
    iterator = iter(batches)
    last = next(iterator)
    start = time.perf_counter()
    for _, last in zip(range(count - 1), iterator):
        pass
    wall = time.perf_counter() - start
    del iterator  # reaps the workers, so their CPU time is counted
    return wall, _children_cpu() - cpu0, last


def compare(where: str, shards: str, files: list[str], args, storage_options: dict) -> list[dict]:
    cfg = DataConfig(train=shards, views=args.views, batch_size=args.batch_size, workers=args.workers,
                     shuffle_buffer=args.shuffle_buffer, seed=args.seed, storage_options=storage_options)
    # Whole chunks per worker: every item a chunk decodes is delivered, so CPU per pair is exact.
    whole = cfg.chunk_steps * max(1, args.workers)
    cfg.steps_per_epoch = steps = -(-args.steps // whole) * whole
    pairs = steps * args.batch_size
    loader = make_loader(cfg, 0, 0, 1)
    wall, cpu, _ = _measure(loader, steps)
    rss, private = loader.stats["peak_rss_mb"], loader.stats["peak_private_mb"]

    frames = [int(round(s * SAMPLE_RATE)) for s in args.views]
    sampler = RandomSampler(files, replacement=True, num_samples=pairs)
    baseline = DataLoader(PerFile(files, frames, storage_options), batch_size=args.batch_size,
                          sampler=sampler, num_workers=args.workers)
    base_wall, base_cpu, last = _measure(baseline, steps)
    base_rss, base_private = last[-1].max(0).values.tolist()

    per_core, base_per_core = pairs / cpu, pairs / base_cpu
    # the first batch is outside the wall-clock window
    rate, base_rate = (pairs - args.batch_size) / wall, (pairs - args.batch_size) / base_wall
    common = {"workers": args.workers, "views": args.views, "pairs": pairs}
    return [
        {"figure": f"{where}_pairs_per_core", "value": round(per_core, 1), "baseline": round(base_per_core, 1),
         "ratio": round(per_core / base_per_core, 2), "unit": "pairs per worker CPU second", **common},
        {"figure": f"{where}_pairs_per_second", "value": round(rate, 1), "baseline": round(base_rate, 1),
         "ratio": round(rate / base_rate, 2), "unit": "pairs/s wall clock", **common},
        {"figure": f"{where}_peak_rss_per_worker_mb", "value": round(rss, 1), "baseline": round(base_rss, 1),
         "ratio": round(rss / base_rss, 2), "unit": "MB (VmHWM, includes pages shared with the parent)",
         "parent_peak_rss_mb": round(peak_rss_mb(), 1), "shuffle_buffer": args.shuffle_buffer, **common},
        {"figure": f"{where}_peak_private_per_worker_mb", "value": round(private, 1),
         "baseline": round(base_private, 1), "ratio": round(private / base_private, 2) if base_private else None,
         "unit": "MB held by the worker alone (smaps Private_*, sampled after its buffer fills)",
         "shuffle_buffer": args.shuffle_buffer, **common},
    ]


def run(args) -> list[dict]:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        root = Path(tmp)
        shards = args.shards or generate(root, args.utterances, tuple(args.seconds), args.seed)
        files = extract_files(shards, root)
        rows = compare("local", shards, files, args, {})
        if args.no_s3:
            return rows
        with local_s3(bucket="bench") as s3:
            options = s3.storage_options()
            prefix = f"s3://{s3.bucket}"
            for url in [*shard_urls(shards), storage.join(shards, MANIFEST)]:
                storage.write_bytes(f"{prefix}/shards/{url.rsplit('/', 1)[1]}", storage.read_bytes(url), options)
            objects = []
            for path in files:
                objects.append(f"{prefix}/files/{os.path.basename(path)}")
                storage.write_bytes(objects[-1], Path(path).read_bytes(), options)
            rows += compare("s3", f"{prefix}/shards", objects, args, options)
        return rows
