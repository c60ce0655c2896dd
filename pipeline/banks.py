"""Noise and RIR banks on the training device, filled from shard sets and refreshed in the background.

A bank is one int16 tensor [rows, length] on the device plus each row's kind (noise, music, speech,
rir) on the host. Noise clips are cut into rows of exactly `length` samples (long clips into pieces,
the last piece overlapping its neighbour; short clips repeated, as audiomentations repeats short
noise), so every window of a row is real noise and a crop never needs padding or wrap-around.
RIRs are aligned on their direct-path peak (the propagation delay before it is dropped, so
reverberated speech is not delayed) and zero-padded to the row length.

The bank holds at most `budget_bytes` of samples. When the set is larger, the bank keeps the rows
read first from a seeded random shard order, and a daemon thread keeps streaming the set (in a
fresh order every pass) and replaces random rows, so that over a run the whole corpus is used.
"""
from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import asdict
from typing import Callable, Iterator

import numpy as np
import torch

from voxstream.shards import storage
from voxstream.shards.format import (SAMPLE_RATE, Manifest, Sample, build_shard, decode_audio, encode_flac,
                           iter_samples, sample_key, shard_name, shard_urls, write_manifest)
from voxstream.shards.storage import Retry

log = logging.getLogger(__name__)

KINDS = ("noise", "music", "speech", "rir")
NOISE_KINDS = ("noise", "music", "speech")

Rows = Callable[[np.ndarray, int], list[np.ndarray]]


def noise_rows(wave: np.ndarray, length: int) -> list[np.ndarray]:
    """Pieces of exactly `length` samples covering the clip; a short clip is repeated to fill one."""
    if wave.size == 0:
        return []
    if wave.size < length:
        return [np.resize(wave, length)]  # np.resize repeats the clip
    starts = list(range(0, wave.size - length + 1, length))
    if starts[-1] + length < wave.size:
        starts.append(wave.size - length)  # the tail, overlapping the previous piece
    return [wave[s:s + length] for s in starts]


def align_rir(wave: np.ndarray) -> np.ndarray | None:
    """The RIR from its direct-path peak on (the propagation delay dropped); None if it is silent."""
    if not np.any(wave):
        return None
    return wave[int(np.argmax(np.abs(wave))):]


def rir_rows(wave: np.ndarray, length: int) -> list[np.ndarray]:
    """The aligned RIR cut or zero-padded to `length`; a silent RIR is dropped."""
    rir = align_rir(wave)
    return [] if rir is None else [np.pad(rir[:length], (0, max(0, length - rir.size)))]


def _shard_samples(url: str, storage_options: dict | None, retry: Retry) -> Iterator[Sample]:
    """Samples of one shard, read again past a transient error (no sample twice); a shard that keeps
    failing is skipped from where it failed (logged)."""
    try:
        yield from retry.iterate(lambda: iter_samples(url, storage_options), f"read {url}")
    except OSError as e:
        log.error("bank: shard skipped: %s", e)


def stream_rows(url: str, kinds: tuple[str, ...], length: int, cut: Rows, seed: int,
                storage_options: dict | None, retry: Retry) -> Iterator[tuple[int, np.ndarray] | None]:
    """(kind index, row) for the set's clips of `kinds`, pass after pass, each pass in a fresh
    shard order; None marks the end of a pass."""
    urls = shard_urls(url, storage_options)
    rng = np.random.default_rng(seed)
    for _ in itertools.count():
        for shard in rng.permutation(urls):
            for key, meta, flac in _shard_samples(str(shard), storage_options, retry):
                kind = meta.get("kind")
                if kind not in KINDS:
                    raise ValueError(f"{shard}: sample {key} has kind {kind!r}, expected one of {KINDS} "
                                     "(is this a MUSAN-format noise or RIR set?)")
                if kind in kinds:
                    for row in cut(decode_audio(flac), length):
                        yield KINDS.index(kind), row
        yield None


class Bank:
    """Rows of clips on the device: `data` [rows, length] int16, `kinds` [rows] (host, index into KINDS).

    `lock` guards data and kinds: hold it from drawing rows to enqueuing their use, since the
    refresh thread replaces rows in place.
    """

    def __init__(self, data: torch.Tensor, kinds: torch.Tensor, stream: Iterator | None = None, seed: int = 0):
        self.data = data
        self.kinds = kinds
        self.lock = threading.Lock()
        self._stream = stream  # the rest of the set, when it did not fit
        self._rng = np.random.default_rng(seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_shards(cls, url: str, kinds: tuple[str, ...], length: int, budget_bytes: int,
                    device: torch.device | str, seed: int = 0, storage_options: dict | None = None,
                    retry: Retry = Retry()) -> "Bank":
        """Fill a bank with the set's clips of `kinds`, up to `budget_bytes` of samples; `retry` is how
        shard reads are retried (here and in the refresh)."""
        capacity = budget_bytes // (2 * length)
        if capacity < 1:
            raise ValueError(f"bank for {url}: budget {budget_bytes} bytes holds no row of {length} samples")
        cut = rir_rows if kinds == ("rir",) else noise_rows
        stream = stream_rows(url, kinds, length, cut, seed, storage_options, retry)
        rows, row_kinds = [], []
        for item in stream:
            if item is None:  # the whole set fits: nothing left to refresh from
                stream = None
                break
            row_kinds.append(item[0])
            rows.append(item[1])
            if len(rows) == capacity:
                break
        if not rows:
            raise ValueError(f"{url}: no samples of kinds {kinds}")
        data = torch.from_numpy(np.stack(rows))
        if stream is None and kinds == ("rir",):
            data = data[:, :int(data.any(0).nonzero().max()) + 1].contiguous()  # trim to the longest RIR held
        log.info("bank %s: %d rows of %d samples (%.1f MB)%s", url, len(rows), data.shape[1],
                 data.numel() * 2 / 1e6, "" if stream is None else ", a subset: refreshed")
        return cls(data.to(device), torch.tensor(row_kinds), stream, seed)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @property
    def complete(self) -> bool:
        """True when the bank holds the whole set (nothing to refresh)."""
        return self._stream is None

    def counts(self) -> torch.Tensor:
        """Rows per kind, indexed like KINDS."""
        return torch.bincount(self.kinds, minlength=len(KINDS))

    def refresh(self, rows: int) -> int:
        """Replace up to `rows` random rows with the next clips of the stream; returns how many."""
        if self._stream is None:
            return 0
        fresh = list(itertools.islice(filter(None, self._stream), min(rows, len(self.kinds))))
        if not fresh:
            return 0
        where = torch.from_numpy(self._rng.choice(len(self.kinds), size=len(fresh), replace=False))
        block = torch.from_numpy(np.stack([row for _, row in fresh])).to(self.data.device)
        with self.lock:
            self.data.index_copy_(0, where.to(self.data.device), block)
            self.kinds[where] = torch.tensor([kind for kind, _ in fresh])
        return len(fresh)

    def start_refresh(self, interval: float, fraction: float) -> None:
        """Replace `fraction` of the rows every `interval` seconds, in a daemon thread (if not complete)."""
        if self.complete or interval <= 0 or self._thread is not None:
            return
        rows = max(1, int(fraction * len(self.kinds)))

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.refresh(rows)
                except Exception:  # the bank stays usable as it is; say why it stopped changing
                    log.exception("bank refresh stopped")
                    return

        self._thread = threading.Thread(target=loop, name="bank-refresh", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def write_clip_set(url: str, corpus: str, clips: list[tuple[str, np.ndarray]],
                   storage_options: dict | None = None) -> None:
    """A one-shard set of (kind, samples) clips in the shard format: small custom banks, tests, benches."""
    samples = []
    for i, (kind, wave) in enumerate(clips):
        utt = f"{kind}-{i:06d}"
        meta = {"utt": utt, "corpus": corpus, "speaker": None, "session": utt, "group": utt,
                "duration": len(wave) / SAMPLE_RATE, "num_samples": len(wave), "sample_rate": SAMPLE_RATE,
                "source": utt, "kind": kind}
        samples.append(Sample(sample_key(corpus, None, utt, utt), meta, encode_flac(wave)))
    name = shard_name(corpus, 0)
    data, stats = build_shard(samples, name)
    storage.write_bytes(storage.join(url, name), data, storage_options)
    write_manifest(url, Manifest(corpus=corpus, prefix=corpus, shards=[asdict(stats)]), storage_options)
