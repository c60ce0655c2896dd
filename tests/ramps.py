"""Shards of ramps for the pipeline tests: sample i of utterance u holds (slope_u * (i + phase_u))
mod 2**16, so a crop tells which utterance of its group it came from (its slope) and where it started
(its phase), and FLAC round-trips it exactly."""
from __future__ import annotations

import numpy as np

from voxstream.pipeline.loader import DataConfig
from voxstream.shards import storage
from voxstream.shards.format import Manifest, Sample, build_shard, encode_flac, sample_key, shard_name, write_manifest

SR = 16000


def ramp(slope: int, phase: int, n: int) -> np.ndarray:
    return ((slope * (np.arange(n, dtype=np.int64) + phase)) % 65536 - 32768).astype(np.int16)


def make_set(url: str, shard_sizes: list[int], group_size: int = 3, seconds=(1.0, 2.5), seed: int = 0,
             corpus: str = "syn", manifest: bool = True) -> dict[str, tuple[int, int, int]]:
    """Write shards of ramps; return {key: (slope, phase, num_samples)}."""
    rng = np.random.default_rng(seed)
    truth, stats, u = {}, [], 0
    for s, size in enumerate(shard_sizes):
        samples = []
        for i in range(size):
            group = f"{corpus}-s{s}-g{i // group_size}"
            slope, phase, n = 1 + i % group_size, int(rng.integers(65536)), int(rng.uniform(*seconds) * SR)
            key = sample_key(corpus, f"spk{i // group_size}", group, f"u{u}")
            meta = {"utt": f"u{u}", "corpus": corpus, "speaker": f"spk{i // group_size}", "session": group,
                    "group": group, "duration": n / SR, "num_samples": n, "sample_rate": SR, "source": "ramp"}
            samples.append(Sample(key, meta, encode_flac(ramp(slope, phase, n))))
            truth[key] = (slope, phase, n)
            u += 1
        data, st = build_shard(samples, shard_name(corpus, s))
        storage.write_bytes(storage.join(url, st.name), data)
        stats.append(vars(st))
    if manifest:
        write_manifest(url, Manifest(corpus=corpus, prefix=corpus, shards=stats))
    return truth


def config(train, **kw) -> DataConfig:
    base = dict(train=train, views=[0.5, 0.5], batch_size=4, workers=0, shuffle_buffer=16,
                steps_per_epoch=6, min_duration=0.3, chunk_steps=2)
    return DataConfig(**{**base, **kw})
