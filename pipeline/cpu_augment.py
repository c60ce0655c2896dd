"""The CPU-side augmentation (`augment.cpu`): an audiomentations Compose run on every crop of the stream.

For transforms the device path does not cover (gain, filters, pitch, codecs...); it costs worker CPU
(`bench.py pipeline` reports it as cpu_augment_pairs_per_core: Gain, then noise from a shard set,
took a worker core from 1,522 to 382 pairs of 2-s crops a second, as audiomentations 0.43 decodes a
whole noise file per call), so noise and reverb are cheaper on the device (augment.noise, augment.rir).
The recipe lists transforms by audiomentations class name with their keyword arguments:

    augment:
      cpu:
        - {name: Gain, min_gain_db: -6, max_gain_db: 6, p: 0.5}
        - {name: AddBackgroundNoise, sounds_path: s3://bucket/musan, kind: music, min_snr_db: 5, max_snr_db: 15, p: 0.3}
        - {name: ApplyImpulseResponse, ir_path: s3://bucket/rirs, p: 0.3}

It runs in two places. In the trainer, before any worker starts, `prepare_cpu_augment` checks the
entries and turns each `sounds_path` / `ir_path` that is a shard set URL into a local folder of FLAC
files, which audiomentations reads: the set's clips of `kind` (default noise, or rir for `ir_path`),
written once under the cache folder (`default_cache_dir`). RIRs are written aligned on their
direct-path peak, as in the device bank, so reverb adds no delay. The trainer passes the prepared
entries to `make_loader(..., cpu_augment=...)`. In each stream (a loader worker, or the trainer
itself when `workers` is 0; pipeline/batches.py) `build_compose` makes the Compose once per pass and
`augment_items` runs it on each crop of each batch's items: every item is seeded from its chunk's
generator, so a batch stays a function of (seed, epoch, rank, stream, chunk) and resuming mid-epoch
gives the same crops; each view gets its own draw; crops go back to int16 (clipped) for the ring.

Nothing here imports torch. audiomentations (about 1 s to import, librosa included) is imported only
when the list is not empty: a stream without CPU augmentation only draws its items' unused seeds
(about 15 us a batch).
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from voxstream.shards import storage
from voxstream.shards.format import MANIFEST, SAMPLE_RATE, decode_audio, encode_flac, iter_samples, shard_urls

if TYPE_CHECKING:
    from audiomentations import Compose

    from voxstream.pipeline.views import TrainingItem

PATH_ARGS = {"sounds_path": "noise", "ir_path": "rir"}  # argument -> default kind of its clips


def default_cache_dir(out_dir: str) -> str:
    """Where shard sets named by `augment.cpu` are written as FLAC folders: <out_dir>/cpu_augment_cache
    for a local out_dir (it stays with the run), else voxstream-cpu-augment in the system's temp folder.
    Folders are named by the set's URL, so runs sharing a cache write each set once (delete a folder
    to pick up a set rewritten under the same URL)."""
    if storage.is_local(out_dir):
        return os.path.join(out_dir.removeprefix("file://"), "cpu_augment_cache")
    return os.path.join(tempfile.gettempdir(), "voxstream-cpu-augment")


def materialise(url: str, kind: str, cache_dir: str, storage_options: dict | None = None) -> str:
    """A local folder of FLAC files: the clips of `kind` in the shard set at `url`, written once.
    A URL that is not a shard set (no manifest) is returned unchanged."""
    if not storage.exists(storage.join(url, MANIFEST), storage_options):
        return url
    folder = Path(cache_dir) / hashlib.sha256(url.encode()).hexdigest()[:16] / kind
    if folder.is_dir():
        return str(folder)
    from voxstream.pipeline.banks import align_rir  # here: banks imports torch, which workers never load

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
    except OSError:  # another process (another rank) finished it first
        shutil.rmtree(tmp)
    return str(folder)


def _transform(name: object) -> type:
    import audiomentations  # here, not at the top: a stream without CPU augmentation never pays its import

    cls = getattr(audiomentations, str(name), None)
    if not isinstance(cls, type):
        raise ValueError(f"augment.cpu: {name!r} is not an audiomentations transform")
    return cls


def prepare_cpu_augment(specs: list[dict], cache_dir: str, storage_options: dict | None = None) -> list[dict]:
    """The recipe's entries as the streams need them: shard sets replaced by local FLAC folders under
    `cache_dir`, and `kind` consumed. Checked here, in the trainer, by building the Compose once: a
    wrong name or argument fails before any worker starts, naming the entry."""
    prepared = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"augment.cpu[{i}]: expected {{name: <audiomentations transform>, ...}}, got {spec!r}")
        spec = dict(spec)
        _transform(spec["name"])  # a misspelt name fails before any set is copied
        kind = spec.pop("kind", None)
        for arg, default_kind in PATH_ARGS.items():
            if arg in spec:
                spec[arg] = materialise(spec[arg], kind or default_kind, cache_dir, storage_options)
        prepared.append(spec)
    build_compose(prepared)
    return prepared


def build_compose(specs: list[dict]) -> Compose | None:
    """The Compose of prepared entries ({"name": <audiomentations class>, **kwargs}); None when empty."""
    if not specs:
        return None
    transforms = []
    for spec in specs:
        kwargs = dict(spec)
        name = kwargs.pop("name")
        try:
            transforms.append(_transform(name)(**kwargs))
        except (TypeError, ValueError) as e:  # a wrong argument, or a value the transform rejects
            raise ValueError(f"augment.cpu: {name}: {e}") from None
    from audiomentations import Compose

    return Compose(transforms)


def augment_crop(compose: Compose, crop: np.ndarray) -> np.ndarray:
    """One crop (int16 or float) through the Compose: float32 of the same length."""
    wave = crop.astype(np.float32) / 32768 if crop.dtype == np.int16 else crop.astype(np.float32)
    out = compose(samples=wave, sample_rate=SAMPLE_RATE)
    return np.pad(out[:wave.size], (0, max(0, wave.size - out.size)))  # length-changing transforms


def augment_items(compose: Compose, items: list[TrainingItem], seeds: np.ndarray) -> None:
    """Every crop of `items` through the Compose, in place, back to int16 (clipped).

    audiomentations draws from Python's and numpy's global generators: both are seeded from the
    item's seed, so its crops depend on that seed alone, and its views, augmented one after the
    other, each get their own draw. The global states are put back afterwards: with `workers` 0
    this runs in the trainer, whose draws they are."""
    saved = random.getstate(), np.random.get_state()
    try:
        for item, seed in zip(items, seeds):
            random.seed(int(seed))
            np.random.seed(int(seed))
            item.views = [np.clip(np.rint(augment_crop(compose, view) * 32768), -32768, 32767).astype(np.int16)
                          for view in item.views]
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
