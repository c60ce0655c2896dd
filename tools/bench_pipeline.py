"""Pipeline benchmark: two-crop pairs per worker core and memory per worker, shards vs per-file.

Both loaders run in the same process with the same crops (2 x 2 s by default), batch size and worker
count: the pipeline (pipeline.loader.make_loader on tar shards, lean worker processes, dr_flac) and
a simple baseline, a map-style torch DataLoader that reads one file (or one S3 object) per utterance
and seek-decodes the same crops with shards.format.decode_audio (libsndfile), as per-file loaders
do. "Per core" divides pairs by all the CPU seconds the workers used, start-up included (user +
system, from getrusage of the reaped workers), so the figure holds on a busy machine; `steady` leaves out
the pipeline workers' start-up (a fresh interpreter and its imports, about 0.4 s per worker and
pass), and wall-clock pairs/s are reported beside it. S3 is a SeaweedFS server on loopback (shards.locals3). The `decode`
figures isolate the decoder: the same crops read in-process by the pipeline's span reader (dr_flac)
and by decode_audio (libsndfile). The `cpu_augment` figure is the pipeline's pairs per core with a
typical `augment.cpu` chain (CPU_CHAIN) against the same loader without it, in the same run.

The `data_path` figures are what a pass costs storage, counted beneath any read-ahead (pipeline/stats.py):
bytes and read requests per pair, read amplification (bytes read against the crop bytes used), and
wall-clock pairs/s, for local shards, S3, and S3 through the node-local shard cache (data.cache_dir)
on a cold pass (it fills the cache) and a warm one (the next epoch, from the cache).

Data: speech-like synthetic utterances of 2-10 s (harmonic voiced segments with a wandering pitch,
syllable envelopes, pauses and a noise floor), and with --speech DIR also a folder of real
recordings (e.g. LibriSpeech), sharded first with the `folder` corpus rules.
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

from voxstream.pipeline.banks import write_clip_set
from voxstream.pipeline.batches import peak_rss_mb, smaps_mb
from voxstream.pipeline.cpu_augment import prepare_cpu_augment
from voxstream.pipeline.loader import DataConfig, Loader, make_loader
from voxstream.pipeline.sources import open_shard
from voxstream.pipeline.views import read_spans
from voxstream.shards import corpora, storage
from voxstream.shards.format import (MANIFEST, SAMPLE_RATE, Manifest, Sample, audio_frames, build_shard, decode_audio,
                           encode_flac, iter_samples, sample_key, shard_name, shard_urls, write_manifest)
from voxstream.shards.locals3 import local_s3
from voxstream.shards.writer import WriteConfig, write_shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", help="shard-set URL to read instead of generated data")
    parser.add_argument("--speech", help="a folder of real recordings to shard and measure too")
    parser.add_argument("--utterances", type=int, default=300, help="generated utterances")
    parser.add_argument("--seconds", type=float, nargs=2, default=[2.0, 10.0], help="generated lengths")
    parser.add_argument("--views", type=float, nargs="+", default=[2.0, 2.0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256, help="the training default")
    parser.add_argument("--steps", type=int, default=64,
                        help="batches per measurement, rounded up to whole chunks of every worker")
    parser.add_argument("--shuffle-buffer", type=int, default=1024, help="the training default")
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
        samples.append(Sample(key, meta, encode_flac(speechlike(rng, n))))
        if (len(samples) >= per_shard and left == 0) or u == count - 1:
            data, stats = build_shard(samples, shard_name("bench", len(shards)))
            storage.write_bytes(str(root / "shards" / stats.name), data)
            shards.append(vars(stats))
            samples = []
    url = str(root / "shards")
    write_manifest(url, Manifest(corpus="bench", prefix="bench", shards=shards))
    return url


def shard_speech(root: Path, folder: str) -> str:
    """Shards of a folder of real recordings (one group per recording folder) under root/speech."""
    url = str(root / "speech")
    write_shards(corpora.folder(folder, r"(?P<speaker>[^/]+)/(?P<session>[^/]+)/[^/]+$"),
                 WriteConfig(out=url, prefix="speech", shard_size=8 << 20))
    return url


def extract_files(shards: str, root: Path) -> list[str]:
    """One FLAC file per utterance of a shard set, for the baseline."""
    paths = []
    for url in shard_urls(shards):
        for key, _, flac in iter_samples(url):
            path = root / (key.replace("/", "__") + ".flac")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(flac)
            paths.append(str(path))
    return paths


class PerFile(Dataset):
    """The baseline: one file or object per utterance, the same random crops, decode_audio per crop."""

    def __init__(self, urls: list[str], frames: list[int], storage_options: dict | None):
        self.urls, self.frames, self.options = urls, frames, storage_options
        self.calls, self.memory = 0, torch.zeros(3)  # per worker process: peak RSS, PSS, private

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
        if self.calls % 1024 == 64:  # sampled, as the pipeline's workers do: reading smaps is costly
            self.memory = torch.maximum(self.memory, torch.tensor([peak_rss_mb(), *smaps_mb()]))
        return (*crops, self.memory)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _measure(batches, count: int) -> tuple[float, float, list]:
    """(wall seconds, worker CPU seconds, last batch) for `count` batches, worker start-up included."""
    cpu0, start = _children_cpu(), time.perf_counter()
    iterator = iter(batches)
    for _, last in zip(range(count), iterator):
        pass
    wall = time.perf_counter() - start
    del iterator  # reaps the workers, so their CPU time is counted
    return wall, _children_cpu() - cpu0, last


def _row(figure: str, value: float, baseline: float, unit: str, **extra) -> dict:
    return {"figure": figure, "value": round(value, 1), "baseline": round(baseline, 1),
            "ratio": round(value / baseline, 2) if baseline else None, "unit": unit, **extra}


def data_path(figure: str, loader: Loader, wall: float, **common) -> dict:
    """What the pass cost storage, per pair (pipeline/stats.py), and its wall-clock pairs/s."""
    s = loader.stats
    return {"figure": figure, "bytes_per_pair": round(s["bytes_per_pair"]), "requests_per_pair": round(s["requests_per_pair"], 4),
            "read_amplification": round(s["read_amplification"], 2), "pairs_per_second": round(s["pairs"] / wall, 1),
            "storage_bytes": s["storage_bytes"], "storage_requests": s["storage_requests"], **common}


def cached(name: str, shards: str, root: Path, args, storage_options: dict) -> list[dict]:
    """Two passes through a fresh node-local cache: the first fills it, the second (the next epoch) reads it."""
    cfg = _config(shards, args, storage_options)
    cfg.cache_dir = str(root / f"{name}-cache")
    common = {"workers": args.workers, "views": args.views, "batch_size": args.batch_size,
              "pairs": cfg.steps_per_epoch * args.batch_size}
    rows = []
    for epoch, state in enumerate(("cold", "warm")):
        loader = make_loader(cfg, epoch, 0, 1)
        wall, _, _ = _measure(loader, cfg.steps_per_epoch)
        rows.append(data_path(f"{name}_cache_{state}_data_path", loader, wall, **common))
    return rows


def _config(shards: str, args, storage_options: dict) -> DataConfig:
    cfg = DataConfig(train=shards, views=args.views, batch_size=args.batch_size, workers=args.workers,
                     shuffle_buffer=args.shuffle_buffer, seed=args.seed, storage_options=storage_options)
    # Whole chunks per worker: every item a chunk decodes is delivered, so CPU per pair is exact.
    whole = cfg.chunk_steps * max(1, args.workers)
    cfg.steps_per_epoch = -(-args.steps // whole) * whole
    return cfg


def _pipeline(cfg: DataConfig, cpu_augment: list[dict] | None = None) -> tuple[Loader, float, float, float]:
    """(loader, wall seconds, worker CPU seconds, CPU seconds inside the streams) of one epoch."""
    loader = make_loader(cfg, 0, 0, 1, cpu_augment=cpu_augment)
    wall, cpu, _ = _measure(loader, cfg.steps_per_epoch)
    return loader, wall, cpu, loader.stats["cpu_seconds"]  # summed over streams


def compare(name: str, shards: str, files: list[str], args, storage_options: dict) -> list[dict]:
    cfg = _config(shards, args, storage_options)
    steps = cfg.steps_per_epoch
    pairs = steps * args.batch_size
    loader, wall, cpu, in_streams = _pipeline(cfg)
    memory = [loader.stats[k] for k in ("peak_rss_mb", "peak_pss_mb", "peak_private_mb")]

    frames = [int(round(s * SAMPLE_RATE)) for s in args.views]
    sampler = RandomSampler(files, replacement=True, num_samples=pairs)
    baseline = DataLoader(PerFile(files, frames, storage_options), batch_size=args.batch_size,
                          sampler=sampler, num_workers=args.workers)
    base_wall, base_cpu, last = _measure(baseline, steps)
    base_memory = last[-1].max(0).values.tolist()

    common = {"workers": args.workers, "views": args.views, "batch_size": args.batch_size, "pairs": pairs}
    mb = {"shuffle_buffer": args.shuffle_buffer, **common}
    return [
        _row(f"{name}_pairs_per_core", pairs / cpu, pairs / base_cpu, "pairs per worker CPU second",
             steady=round(pairs / in_streams, 1), dup_group_rate=round(loader.stats["dup_group_rate"], 3), **common),
        _row(f"{name}_pairs_per_second", pairs / wall, pairs / base_wall, "pairs/s wall clock", **common),
        _row(f"{name}_peak_rss_per_worker_mb", memory[0], base_memory[0],
             "MB resident (VmHWM), pages shared with other processes included", **mb),
        _row(f"{name}_peak_pss_per_worker_mb", memory[1], base_memory[1],
             "MB proportional (smaps Pss: shared pages split among their users)", **mb),
        _row(f"{name}_peak_private_per_worker_mb", memory[2], base_memory[2], "MB held by the worker alone", **mb),
        data_path(f"{name}_data_path", loader, wall, **common),
    ]


def decode(name: str, shards: str, views: list[float], seed: int) -> dict:
    """Two-crop decode alone, in this process: the pipeline's dr_flac span reader vs decode_audio."""
    samples = [(key, meta["num_samples"], flac) for url in shard_urls(shards) for key, meta, flac in iter_samples(url)]
    frames = [int(round(s * SAMPLE_RATE)) for s in views]
    rng = np.random.default_rng(seed)
    crops = [(key, flac, sorted(int(rng.integers(max(1, n - f + 1))) for f in frames))
             for key, n, flac in samples if n >= max(frames)]
    cpu = {}
    for reader in ("dr_flac", "libsndfile"):
        start = time.process_time()
        for key, flac, starts in crops:
            for begin, f in zip(starts, frames):  # one open per crop: the spans may overlap
                read_spans(key, flac, [(begin, f)]) if reader == "dr_flac" else decode_audio(flac, begin, f)
        cpu[reader] = time.process_time() - start
    return _row(f"{name}_decode_pairs_per_core", len(crops) / cpu["dr_flac"], len(crops) / cpu["libsndfile"],
                "two-crop decodes per CPU second (dr_flac vs libsndfile)", views=views, pairs=len(crops))


CPU_CHAIN = "Gain (-6 to 6 dB), then AddBackgroundNoise (5-15 dB SNR) from a shard set of 10-s noise clips"


def cpu_augment_cost(name: str, shards: str, root: Path, args) -> dict:
    """Pairs per worker CPU second with a typical augment.cpu chain on every crop, against none."""
    rng = np.random.default_rng(args.seed)
    noise = str(root / "cpu-augment-noise")
    write_clip_set(noise, "musan", [("noise", rng.normal(0, rng.uniform(0.01, 0.1), 10 * SAMPLE_RATE)) for _ in range(8)])
    chain = prepare_cpu_augment([
        {"name": "Gain", "min_gain_db": -6.0, "max_gain_db": 6.0, "p": 1.0},
        {"name": "AddBackgroundNoise", "sounds_path": noise, "min_snr_db": 5.0, "max_snr_db": 15.0, "p": 1.0},
    ], str(root / "cpu-augment-cache"))
    cfg = _config(shards, args, {})
    pairs = cfg.steps_per_epoch * args.batch_size
    _, _, plain, plain_steady = _pipeline(cfg)
    _, _, augmented, steady = _pipeline(cfg, chain)
    return _row(f"{name}_cpu_augment_pairs_per_core", pairs / augmented, pairs / plain,
                "pairs per worker CPU second with augment.cpu (baseline: the same loader without it)",
                steady=round(pairs / steady, 1), baseline_steady=round(pairs / plain_steady, 1), chain=CPU_CHAIN,
                workers=args.workers, views=args.views, batch_size=args.batch_size, pairs=pairs)


def measure(name: str, shards: str, root: Path, args) -> list[dict]:
    files = extract_files(shards, root / f"{name}-files")
    rows = [decode(name, shards, args.views, args.seed), *compare(f"{name}_local", shards, files, args, {}),
            cpu_augment_cost(name, shards, root, args)]
    if args.no_s3:
        return rows
    with local_s3(bucket="bench") as s3:
        options = s3.storage_options()
        prefix = f"s3://{s3.bucket}/{name}"
        for url in [*shard_urls(shards), storage.join(shards, MANIFEST)]:
            storage.write_bytes(f"{prefix}/shards/{url.rsplit('/', 1)[1]}", storage.read_bytes(url), options)
        objects = []
        for path in files:
            objects.append(f"{prefix}/files/{os.path.basename(path)}")
            storage.write_bytes(objects[-1], Path(path).read_bytes(), options)
        rows += compare(f"{name}_s3", f"{prefix}/shards", objects, args, options)
        rows += cached(f"{name}_s3", f"{prefix}/shards", root, args, options)
    return rows


def run(args) -> list[dict]:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        root = Path(tmp)
        sets = {"synthetic": args.shards or generate(root, args.utterances, tuple(args.seconds), args.seed)}
        if args.speech:
            sets["speech"] = shard_speech(root, args.speech)
        return [row for name, url in sets.items() for row in measure(name, url, root, args)]
