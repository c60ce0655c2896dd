"""The CPU-side option: an audiomentations Compose, run per sample in the loader workers.

For transforms the device path does not cover (gain, filters, pitch, codecs...) and as a reference.
The recipe lists transforms by audiomentations class name with their keyword arguments:

    augment:
      cpu:
        - {name: Gain, min_gain_db: -6, max_gain_db: 6, p: 0.5}
        - {name: AddBackgroundNoise, sounds_path: s3://bucket/musan, kind: music, min_snr_db: 5, max_snr_db: 15, p: 0.3}
        - {name: ApplyImpulseResponse, ir_path: s3://bucket/rirs, p: 0.3}

`sounds_path` / `ir_path` may be a shard set URL: its clips of `kind` (default noise, or rir for
`ir_path`) are written once as FLAC files under a local cache folder, which audiomentations reads.
RIRs are written aligned on their direct-path peak, as in the device bank, so reverb adds no delay.
Build the Compose in the main process, before the workers start, so the folder is written once.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import audiomentations
import numpy as np

from voxstream.pipeline.banks import align_rir
from voxstream.shards import storage
from voxstream.shards.format import MANIFEST, SAMPLE_RATE, decode_audio, encode_flac, iter_samples, shard_urls

PATH_ARGS = {"sounds_path": "noise", "ir_path": "rir"}  # argument -> default kind of its clips


def materialise(url: str, kind: str, cache_dir: str, storage_options: dict | None = None) -> str:
    """A local folder of FLAC files: the clips of `kind` in the shard set at `url`, written once.
    A URL that is not a shard set (no manifest) is returned unchanged."""
    if not storage.exists(storage.join(url, MANIFEST), storage_options):
        return url
    folder = Path(cache_dir) / hashlib.sha256(url.encode()).hexdigest()[:16] / kind
    if folder.is_dir():
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{kind}-"))
    count = 0
    for shard in shard_urls(url, storage_options):
        for key, meta, flac in iter_samples(shard, storage_options):
            if meta.get("kind") != kind:
                continue
            if kind == "rir":
                rir = align_rir(decode_audio(flac))
                flac = b"" if rir is None else encode_flac(rir)
            if flac:
                (tmp / f"{count:07d}.flac").write_bytes(flac)
                count += 1
    if not count:
        shutil.rmtree(tmp)
        raise ValueError(f"{url}: no samples of kind {kind!r}")
    try:
        os.replace(tmp, folder)  # the folder appears complete or not at all
    except OSError:  # another process finished it first
        shutil.rmtree(tmp)
    return str(folder)


def build_cpu_augment(specs: list[dict], cache_dir: str, storage_options: dict | None = None
                      ) -> audiomentations.Compose | None:
    """A Compose from recipe entries ({"name": <audiomentations class>, **kwargs}); None when empty."""
    transforms = []
    for spec in specs:
        kwargs = dict(spec)
        name = kwargs.pop("name", None)
        cls = getattr(audiomentations, str(name), None)
        if not isinstance(cls, type):
            raise ValueError(f"augment.cpu: {name!r} is not an audiomentations transform")
        kind = kwargs.pop("kind", None)
        for arg, default_kind in PATH_ARGS.items():
            if arg in kwargs:
                kwargs[arg] = materialise(kwargs[arg], kind or default_kind, cache_dir, storage_options)
        try:
            transforms.append(cls(**kwargs))
        except TypeError as e:
            raise ValueError(f"augment.cpu: {name}: {e}") from None
    return audiomentations.Compose(transforms) if transforms else None


def augment_crop(compose: audiomentations.Compose, crop: np.ndarray) -> np.ndarray:
    """One crop (int16 or float) through the Compose: float32 of the same length."""
    wave = crop.astype(np.float32) / 32768 if crop.dtype == np.int16 else crop.astype(np.float32)
    out = compose(samples=wave, sample_rate=SAMPLE_RATE)
    return np.pad(out[:wave.size], (0, max(0, wave.size - out.size)))  # length-changing transforms
