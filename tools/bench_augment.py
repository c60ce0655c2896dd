"""`bench.py augment`: crops/s of the batched device augmentation (noise + reverb) against
per-sample audiomentations doing the same noise + reverb in the same run, and on CUDA when present.

Without --noise/--rir it generates its own banks (coloured noise, tones, voiced babble, exponentially
decaying RIRs of 1 s) in a temporary folder.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from voxstream.pipeline.augment import Augmenter, AugmentConfig
from voxstream.pipeline.banks import write_clip_set
from voxstream.pipeline.cpu_augment import augment_crop, build_compose, prepare_cpu_augment
from voxstream.shards.format import SAMPLE_RATE as SR

NOISE_AND_REVERB = dict(p_none=0.0, p_reverb=0.0, p_noise=0.0, p_both=1.0)


def noise_and_reverb(noise_url: str, rir_url: str) -> AugmentConfig:
    """Every crop reverberated, then mixed with one noise clip (0-15 dB): the work the figures time."""
    return AugmentConfig(noise=noise_url, rir=rir_url, p_categories=[1.0, 0.0, 0.0], **NOISE_AND_REVERB)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--noise", default="", help="MUSAN-format shard set URL (default: generated)")
    parser.add_argument("--rir", default="", help="RIR shard set URL (default: generated)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-crops", type=int, default=64,
                        help="crops run through audiomentations, one by one (its rate is per crop)")
    parser.add_argument("--device-crops", type=int, default=512, help="crops in one CUDA call (the 3 ms target)")
    parser.add_argument("--seed", type=int, default=0)


def generate_sets(folder: Path, seed: int) -> tuple[str, str]:
    """A small MUSAN-like set (noise, music, speech) and an RIR set, written as shards."""
    rng = np.random.default_rng(seed)
    t = np.arange(10 * SR) / SR
    colour = lambda: np.cumsum(rng.normal(size=t.size)) * rng.uniform(0, 1) + rng.normal(size=t.size)
    noise = [("noise", 0.05 * (w := colour()) / np.abs(w).max()) for _ in range(16)]
    music = [("music", 0.1 * sum(np.sin(2 * np.pi * f * t) for f in rng.uniform(110, 880, 3))) for _ in range(16)]
    speech = [("speech", 0.1 * np.sign(np.sin(2 * np.pi * rng.uniform(90, 220) * t[:4 * SR]))
               * np.sin(2 * np.pi * 3 * t[:4 * SR]) ** 2) for _ in range(32)]
    rirs = []
    for rt60 in rng.uniform(0.2, 0.8, 32):
        tail = rng.normal(size=SR) * np.exp(-6.9 * np.arange(SR) / (rt60 * SR)) * 0.1
        tail[0] = 0.8
        rirs.append(("rir", np.concatenate([np.zeros(int(rng.integers(0, 400))), tail])))
    write_clip_set(str(folder / "musan"), "musan", noise + music + speech)
    write_clip_set(str(folder / "rirs"), "rirs", rirs)
    return str(folder / "musan"), str(folder / "rirs")


def crops_per_s(aug: Augmenter, views: list[torch.Tensor], repeats: int, cuda: bool) -> float:
    """Median rate over `repeats` passes of every view through the augmenter (after one warm-up)."""
    times = []
    for i in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for view in views:
            aug(view)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sum(len(v) for v in views) / statistics.median(times[1:])


def run(args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        noise_url, rir_url = (args.noise, args.rir) if args.noise and args.rir else generate_sets(Path(tmp), args.seed)
        length = round(args.seconds * SR)
        shape = dict(batch=args.batch, views=args.views, seconds=args.seconds)
        same = noise_and_reverb(noise_url, rir_url)
        kaldi = AugmentConfig(noise=noise_url, rir=rir_url, **NOISE_AND_REVERB)
        g = torch.Generator().manual_seed(args.seed)
        views = [0.1 * torch.randn(args.batch, length, generator=g) for _ in range(args.views)]

        rows = []
        cpu = {"device": "cpu", "threads": torch.get_num_threads(), **shape}
        ours = crops_per_s(Augmenter.from_config(same, "cpu", args.seed), views, args.repeats, cuda=False)
        rows.append({"figure": "augment_cpu", "value": round(ours, 1), "unit": "crops/s",
                     "work": "noise (0-15 dB) + reverb on every crop", **cpu})
        baseline = audiomentations_rate(noise_url, rir_url, views[0][:args.baseline_crops].numpy(), Path(tmp))
        rows.append({"figure": "audiomentations_cpu", "value": round(baseline, 1), "unit": "crops/s",
                     "work": "AddBackgroundNoise (0-15 dB) + ApplyImpulseResponse per crop", **cpu,
                     "crops": min(args.baseline_crops, args.batch)})
        rows.append({"figure": "augment_cpu_speedup", "value": round(ours / baseline, 2), "unit": "x",
                     "baseline": "audiomentations_cpu", **cpu})
        mixed = crops_per_s(Augmenter.from_config(kaldi, "cpu", args.seed), views, args.repeats, cuda=False)
        rows.append({"figure": "augment_cpu_kaldi_mix", "value": round(mixed, 1), "unit": "crops/s",
                     "work": "reverb + noise/music/babble (3-7 clips) on every crop", **cpu})
        if torch.cuda.is_available():
            rows += cuda_rows(same, kaldi, views, args, shape, ours)
        return rows


def audiomentations_rate(noise_url: str, rir_url: str, crops: np.ndarray, cache: Path) -> float:
    compose = build_compose(prepare_cpu_augment([
        {"name": "ApplyImpulseResponse", "ir_path": rir_url, "p": 1.0},
        {"name": "AddBackgroundNoise", "sounds_path": noise_url, "kind": "noise",
         "min_snr_db": 0.0, "max_snr_db": 15.0, "p": 1.0},
    ], str(cache / "cpu-cache")))
    for crop in crops[:4]:  # warm-up: librosa's first load compiles and imports lazily
        augment_crop(compose, crop)
    start = time.perf_counter()
    for crop in crops:
        augment_crop(compose, crop)
    return len(crops) / (time.perf_counter() - start)


def cuda_rows(same: AugmentConfig, kaldi: AugmentConfig, views: list[torch.Tensor],
              args: argparse.Namespace, shape: dict, cpu_rate: float) -> list[dict]:
    gpu = {"device": "cuda", "gpu": torch.cuda.get_device_name(), **shape}
    on_device = [v.cuda() for v in views]
    aug = Augmenter.from_config(same, "cuda", args.seed)
    rate = crops_per_s(aug, on_device, max(args.repeats, 10), cuda=True)
    rows = [{"figure": "augment_cuda", "value": round(rate, 1), "unit": "crops/s",
             "work": "noise (0-15 dB) + reverb on every crop", **gpu},
            {"figure": "augment_cuda_speedup_over_cpu", "value": round(rate / cpu_rate, 1), "unit": "x",
             "baseline": "augment_cpu", **gpu}]
    big = [0.1 * torch.randn(args.device_crops, on_device[0].shape[1], device="cuda")]
    for name, cfg in (("augment_cuda_ms", same), ("augment_cuda_ms_kaldi_mix", kaldi)):
        crops = crops_per_s(Augmenter.from_config(cfg, "cuda", args.seed), big, max(args.repeats, 20), cuda=True)
        rows.append({"figure": name, "value": round(1000 * args.device_crops / crops, 3), "unit": "ms",
                     "crops": args.device_crops, "seconds": args.seconds, "device": "cuda",
                     "gpu": torch.cuda.get_device_name(), "target_ms": 3.0})
    return rows
