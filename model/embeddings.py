"""Speaker embeddings for evaluation: audio sources, length-bucketed extraction, a per-utterance cache.

Audio sources yield (id, float32 mono waveform at 16 kHz):
- `FileAudio(paths)`: audio files by id, and `FileAudio.under(root, ids)` where ids are paths relative
  to root, as in VoxCeleb trial lists (`id10270/5r0dWxy17C8/00001.wav`); other sample rates are
  resampled, channels averaged (`to_mono_16k`).
- `ShardAudio(url, select)`: samples of a shard set. A trial id names a shard sample by dropping its
  extension and matching the key's last three parts (sanitised as `shards.format.sample_key` does):
  `id10270/5r0dWxy17C8/00001.wav` is the sample `<any corpus>/id10270/5r0dWxy17C8/00001`.

An utterance's embedding depends only on the utterance, never on its batch neighbours: whole
utterances are floored to a multiple of `length_step` (0.1 s by default) and batched with others of
exactly that length, so no padding ever enters the statistics pooling.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from torch import nn
from tqdm import tqdm

from voxstream.shards.format import SAMPLE_RATE, decode_audio, iter_samples, sample_key, shard_urls
from voxstream.shards.storage import Retry

log = logging.getLogger(__name__)


@dataclass
class EmbedOptions:
    crops: int = 0                 # 0: the whole utterance; N: mean of N evenly spaced fixed crops
    crop_seconds: float = 3.0
    length_step: float = 0.1       # whole utterances are floored to a multiple of this (seconds)
    batch_size: int = 32           # waveforms per forward pass
    workers: int = 4               # threads reading and decoding audio
    buffer_seconds: float = 3600.0  # audio held while batches of equal length fill up

    def identity(self) -> dict:
        """The options that change an embedding's value (what the cache is keyed by)."""
        return {"crops": self.crops, "crop_seconds": self.crop_seconds if self.crops else None,
                "length_step": None if self.crops else self.length_step}


def trial_suffix(trial_id: str) -> str:
    """The last three shard-key parts a trial id names: `spk/session/utt.wav` -> `spk/session/utt`."""
    parts = PurePosixPath(trial_id).with_suffix("").parts
    if len(parts) < 3:
        raise ValueError(f"trial id {trial_id!r}: a shard source needs ids of the form speaker/session/utt")
    return sample_key("x", *parts[-3:]).split("/", 1)[1]


def _prefetch(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """fn(item) for each item, in order, computed by `workers` threads a bounded distance ahead."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * max(1, workers):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _duration(path: str) -> float:
    try:
        info = sf.info(path)
    except sf.LibsndfileError as e:
        raise ValueError(f"{path}: cannot decode audio ({e})") from None
    return info.frames / info.samplerate


def to_mono_16k(wave: np.ndarray | torch.Tensor, rate: int, name: str = "audio") -> np.ndarray:
    """float32 mono 16 kHz samples of a [samples] or [channels, samples] waveform: channels are
    averaged, other rates resampled (torchaudio's sinc interpolation)."""
    wave = torch.as_tensor(wave, dtype=torch.float32)
    if wave.ndim == 2 and wave.shape[0] > wave.shape[1]:
        raise ValueError(f"{name}: 2-D audio is [channels, samples], got shape {tuple(wave.shape)}: transpose it")
    if wave.ndim not in (1, 2) or wave.shape[-1] == 0:
        raise ValueError(f"{name}: expected [samples] or [channels, samples] audio, got shape {tuple(wave.shape)}")
    if rate <= 0:
        raise ValueError(f"{name}: sample rate must be positive, got {rate}")
    wave = wave.mean(dim=0) if wave.ndim == 2 else wave
    if rate != SAMPLE_RATE:
        wave = AF.resample(wave, rate, SAMPLE_RATE)
    return wave.numpy()


def read_wave(path: str) -> np.ndarray:
    """float32 mono 16 kHz samples of an audio file (soundfile: torchaudio.load needs torchcodec)."""
    try:
        wave, rate = sf.read(path, dtype="float32", always_2d=True)
    except sf.LibsndfileError as e:
        raise ValueError(f"{path}: cannot decode audio ({e})") from None
    if wave.shape[0] == 0:
        raise ValueError(f"{path}: empty audio")
    return to_mono_16k(wave.T, rate, path)


class FileAudio:
    """Audio files by id, read longest first so equal lengths arrive together."""

    def __init__(self, paths: dict[str, str], workers: int = 4, where: str = "audio", what: str = "utterance"):
        missing = [i for i, p in paths.items() if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{where}: {len(missing)} {what}(s) missing, first: " + ", ".join(missing[:5]))
        seconds = dict(zip(paths, _prefetch(lambda i: _duration(paths[i]), paths, workers)))
        self.order = sorted(paths, key=seconds.__getitem__, reverse=True)
        self.paths, self.workers = paths, workers

    @classmethod
    def under(cls, root: str, ids: list[str], workers: int = 4) -> "FileAudio":
        """Trial utterances named by their paths relative to `root`."""
        return cls({i: os.path.join(root, i) for i in ids}, workers, root, "trial utterance")

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        return _prefetch(lambda i: (i, read_wave(self.paths[i])), self.order, self.workers)


class ShardAudio:
    """Selected samples of a shard set: `select(key)` gives the sample's id, or None to skip it.

    A transient read error is retried (`retry`), resuming after the samples already read; a shard
    that stays unreadable, or is not a tar, is skipped and listed in `failed` (its ids then show up as
    missing in the caller). Two keys selecting the same id is an error: the mapping is ambiguous.
    """

    def __init__(self, url: str, select: Callable[[str], str | None], limit: int = 0,
                 workers: int = 4, storage_options: dict | None = None, retry: Retry = Retry()):
        self.url, self.select, self.limit = url, select, limit
        self.workers, self.storage_options, self.retry = workers, storage_options, retry
        self.failed: list[str] = []

    def _samples(self) -> Iterator[tuple[str, str, bytes]]:
        taken: dict[str, str] = {}
        for shard in shard_urls(self.url, self.storage_options):
            try:
                for key, _meta, flac in self.retry.iterate(lambda: iter_samples(shard, self.storage_options),
                                                           f"read {shard}"):
                    ident = self.select(key)
                    if ident is None:
                        continue
                    if ident in taken:
                        raise ValueError(f"{self.url}: samples {taken[ident]} and {key} both match {ident}")
                    taken[ident] = key
                    yield ident, key, flac
                    if self.limit and len(taken) >= self.limit:
                        return
            except (OSError, tarfile.TarError) as e:
                log.warning("%s: shard skipped: %s", shard, e)
                self.failed.append(shard)
        if self.failed:
            log.warning("%s: skipped %d unreadable shard(s)", self.url, len(self.failed))

    @staticmethod
    def _decode(sample: tuple[str, str, bytes]) -> tuple[str, np.ndarray]:
        ident, key, flac = sample
        try:
            return ident, decode_audio(flac).astype(np.float32) / 32768.0
        except sf.LibsndfileError as e:
            raise ValueError(f"{key}: cannot decode audio ({e})") from None

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        return _prefetch(self._decode, self._samples(), self.workers)


def _views(ident: str, wave: np.ndarray, opts: EmbedOptions) -> np.ndarray:
    """[k, T] waveforms whose embeddings make the utterance's: one whole-utterance row, or k crops."""
    if len(wave) == 0:
        raise ValueError(f"{ident}: empty audio")
    if opts.crops:
        size = round(opts.crop_seconds * SAMPLE_RATE)
        if len(wave) < size:   # a short utterance fills its crop by repeating itself, not with silence
            wave = np.resize(wave, size)
        starts = np.linspace(0, len(wave) - size, opts.crops).round().astype(int)
        return np.stack([wave[s:s + size] for s in starts])
    step = round(opts.length_step * SAMPLE_RATE)
    return wave[None, :(len(wave) // step * step) or len(wave)]


@torch.no_grad()
def extract(embedder: nn.Module, audio: Iterable[tuple[str, np.ndarray]], opts: EmbedOptions,
            device: torch.device | str) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, embeddings [n, D]) batch by batch; each embedding is the mean of its unit-norm views."""
    def run(bucket: list[tuple[str, np.ndarray]]) -> tuple[list[str], np.ndarray]:
        x = torch.from_numpy(np.concatenate([v for _, v in bucket])).to(device)
        z = nn.functional.normalize(embedder(x).float(), dim=1).cpu().numpy()
        rows = np.cumsum([0] + [len(v) for _, v in bucket])
        return [i for i, _ in bucket], np.stack([z[a:b].mean(axis=0) for a, b in zip(rows[:-1], rows[1:])])

    per_batch = max(1, opts.batch_size // max(1, opts.crops))
    budget = opts.buffer_seconds * SAMPLE_RATE
    buckets: dict[int, list] = defaultdict(list)
    held = 0
    for ident, wave in audio:
        views = _views(ident, wave, opts)
        bucket = buckets[views.shape[1]]
        bucket.append((ident, views))
        held += views.size
        # A full bucket runs; past the memory budget the fullest one runs early, as a smaller batch.
        length = views.shape[1] if len(bucket) >= per_batch else None
        if length is None and held > budget:
            length = max(buckets, key=lambda n: n * len(buckets[n]))
        if length is not None:
            done = buckets.pop(length)
            held -= sum(v.size for _, v in done)
            yield run(done)
    for length in sorted(buckets, reverse=True):
        yield run(buckets[length])


def model_fingerprint(module: nn.Module) -> str:
    """sha256 of the weights: a cache made with other weights is never reused."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class EmbeddingCache:
    """Embeddings by utterance id for one (model, options, source): `<folder>/emb-<hash>.npz`.

    Every embedding is valid on its own, so a run that stops half-way still saves what it computed.
    """

    def __init__(self, folder: str | Path, fingerprint: str, opts: EmbedOptions, source: str):
        identity = {"model": fingerprint, "options": opts.identity(), "source": source}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
        self.path = Path(folder) / f"emb-{digest}.npz"
        self.emb: dict[str, np.ndarray] = {}
        if self.path.exists():
            with np.load(self.path, allow_pickle=False) as f:
                self.emb = dict(zip(f["ids"].tolist(), f["emb"]))

    def __contains__(self, ident: str) -> bool:
        return ident in self.emb

    def __len__(self) -> int:
        return len(self.emb)

    def matrix(self, ids: list[str]) -> np.ndarray:
        return np.stack([self.emb[i] for i in ids])

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, ids=np.array(list(self.emb), dtype=str), emb=np.stack(list(self.emb.values())))
        tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, self.path)

    def fill(self, embedder: nn.Module, audio: Iterable[tuple[str, np.ndarray]], opts: EmbedOptions,
             device: torch.device | str, total: int | None = None, desc: str = "embeddings") -> dict:
        """Embed every utterance `audio` yields into the cache; returns the throughput figures."""
        seconds = 0.0

        def counted() -> Iterator[tuple[str, np.ndarray]]:
            nonlocal seconds
            for ident, wave in audio:
                seconds += len(wave) / SAMPLE_RATE
                yield ident, wave

        embedder.eval().to(device)
        start, count = time.perf_counter(), 0
        try:
            with tqdm(total=total, desc=desc, unit="utt", dynamic_ncols=True) as bar:
                for ids, z in extract(embedder, counted(), opts, device):
                    self.emb.update(zip(ids, z))
                    count += len(ids)
                    bar.update(len(ids))
        finally:
            if count:
                self.save()
        wall = time.perf_counter() - start
        return {"computed": count, "audio_seconds": round(seconds, 1), "wall_seconds": round(wall, 2),
                "utterances_per_second": round(count / wall, 1) if wall else None,
                "realtime_factor": round(seconds / wall, 1) if wall else None}
