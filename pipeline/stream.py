"""Resampled, infinite streams of samples (shards.format.Sample) over shards, corpora mixed per sample,
each with its global index (pipeline/sources.py; -1 without a manifest or a `position`).

Each shard visit picks a shard at random and enters it at a random tar block: it finds the next tar
header there, skips to the next group boundary, reads to the end, then wraps to the start and reads
up to where it began. Every
visit therefore covers the whole shard in a rotated order, and any prefix of a visit (a chunk of
steps may stop anywhere) is a uniformly placed window of the shard. This is what lets every chunk of
steps be seeded on its own (see loader.py) without favouring the first samples of each shard, and lets
four workers share one shard without reading the same window.

A shard that cannot be read (missing, truncated, not a tar, wrong size) is retried for transient
storage errors (connection refused or reset, timeouts, 5xx: storage.transient) by the `retry`
policy (storage.Retry), each retry logged and counted in `stats.retries`; a shard still unreadable
is then skipped and counted in `stats.shards_skipped` (logged with its URL); with `strict` it
raises instead. A sample lacking its .flac or .json member (`stats.samples_incomplete`), whose
metadata is not a JSON object (`stats.samples_skipped`), or whose FLAC bytes fail the checksum
recorded at sharding (`stats.samples_corrupt`, see shards.format.flac_intact) is skipped, counted
and logged, once per visit.

Every request that reaches storage is counted with its bytes (`stats.storage_requests`,
`stats.storage_bytes`), beneath any read-ahead, the same way for local files and object stores
(storage.counted); with the node's shard cache (shards/cache.py) only the copies it makes are, so a
pass over cached shards counts none.
"""
from __future__ import annotations

import json
import logging
import os
from itertools import groupby
from typing import IO, Iterator

import numpy as np

from voxstream.pipeline.sources import Corpus, Shard, open_shard
from voxstream.pipeline.stats import StreamStats
from voxstream.shards.cache import ShardCache
from voxstream.shards.format import Sample, flac_intact
from voxstream.shards.storage import Retry

log = logging.getLogger(__name__)

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_RESYNC_WINDOW = 64 << 10


class CorruptShard(ValueError):
    """The shard's bytes are not a well-formed tar of samples."""


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return False
    return stored == sum(header[:148]) + 8 * 32 + sum(header[156:])


def _parse_header(header: bytes, where: str) -> tuple[str, int, bool]:
    """(member name, data size, is a regular file) of a ustar header block."""
    if header[257:262] != b"ustar":
        raise CorruptShard(f"{where}: not a tar header")
    try:
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise CorruptShard(f"{where}: bad member size") from None
    name = header[:100].split(b"\0", 1)[0].decode()
    prefix = header[345:500].split(b"\0", 1)[0].decode()
    return (f"{prefix}/{name}" if prefix else name), size, header[156:157] in (b"0", b"\0")


def _split(name: str) -> tuple[str, str]:
    """(sample key, extension) of a member name: WebDataset keys end at the first dot of the basename."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext


class _ShardFile:
    """Positioned reads of one shard, from the node's cache when there is one; a transient error
    reopens the shard and reads again. What reaches storage is counted in `stats`."""

    def __init__(self, shard: Shard, storage_options: dict | None, retry: Retry, stats: StreamStats,
                 cache: ShardCache | None = None):
        self.shard, self.options, self.retry, self.stats, self.cache = shard, storage_options, retry, stats, cache
        self.file: IO[bytes] | None = retry.call(self._open, f"open {shard.url}", self._retried)
        self.size: int = self.file.seek(0, os.SEEK_END)
        if shard.size is not None and shard.size != self.size:
            self.file.close()
            raise CorruptShard(f"{shard.url}: {self.size} bytes, the manifest says {shard.size}")

    def _open(self) -> IO[bytes]:
        return open_shard(self.shard.url, self.options, on_fetch=self._fetched, cache=self.cache,
                          sha256=self.shard.sha256)

    def _fetched(self, size: int) -> None:
        self.stats.storage_requests += 1
        self.stats.storage_bytes += size

    def read(self, pos: int, n: int) -> bytes:
        def attempt() -> bytes:
            if self.file is None:  # the previous attempt failed: a fresh connection, inside the retry
                self.file = self._open()
            try:
                self.file.seek(pos)
                return self.file.read(n)
            except Exception:  # botocore's and aiohttp's connection errors are not OSError
                self.close()
                raise
        return self.retry.call(attempt, f"read {self.shard.url} at {pos}", self._retried)

    def _retried(self) -> None:
        self.stats.retries += 1

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def resync(self, pos: int) -> int:
        """Offset of the first valid tar header at or after block offset `pos` (the size if none)."""
        while pos < self.size:
            window = self.read(pos, _RESYNC_WINDOW + BLOCK)
            hit = window.find(b"ustar", 257)
            while 0 <= hit < _RESYNC_WINDOW + 257:
                start = hit - 257
                if start % BLOCK == 0 and _checksum_ok(window[start:start + BLOCK]):
                    return pos + start
                hit = window.find(b"ustar", hit + 1)
            pos += _RESYNC_WINDOW
        return self.size

    def members(self, pos: int, stop: int) -> Iterator[tuple[int, str, bytes]]:
        """(header offset, name, data) of the regular members from `pos` up to offset `stop`."""
        url = self.shard.url
        while pos < stop:
            header = self.read(pos, BLOCK)
            if header == _ZERO_BLOCK:
                return
            if len(header) < BLOCK:
                raise CorruptShard(f"{url}: truncated at byte {pos} (no end-of-archive marker)")
            name, size, regular = _parse_header(header, f"{url} at byte {pos}")
            data = self.read(pos + BLOCK, size)
            if len(data) < size:
                raise CorruptShard(f"{url}: member {name} truncated ({len(data)} of {size} bytes)")
            if regular:
                yield pos, name, data
            pos += BLOCK + size + (-size % BLOCK)


def group_of(sample: Sample) -> str:
    """The unit of cross-utterance positives; the utterance itself when the metadata has none."""
    return str(sample.meta.get("group") or sample.key)


class _Unsound(ValueError):
    """Why a sample is skipped; `counter` names the StreamStats field that counts it."""

    def __init__(self, counter: str, reason: str):
        super().__init__(reason)
        self.counter = counter


def _sample(key: str, parts: dict[str, bytes]) -> Sample:
    """The sample of one key's members, or _Unsound."""
    if "flac" not in parts or "json" not in parts:
        raise _Unsound("samples_incomplete", f"members {sorted(parts)}, expected flac and json")
    try:
        meta = json.loads(parts["json"])
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise _Unsound("samples_skipped", "its .json is not a JSON object")
    if not flac_intact(meta, parts["flac"]):
        raise _Unsound("samples_corrupt", "its .flac fails the crc32 recorded at sharding")
    return Sample(key, meta, parts["flac"])


def _by_key(members: Iterator[tuple[int, str, bytes]]) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(offset of its first member, key, {extension: data}) for each run of members sharing a key."""
    for key, run in groupby(members, key=lambda member: _split(member[1])[0]):
        run = list(run)
        yield run[0][0], key, {_split(name)[1]: data for _, name, data in run}


def _judged(keyed: Iterator[tuple[int, str, dict[str, bytes]]], url: str,
            stats: StreamStats) -> Iterator[tuple[int, Sample]]:
    """The sound samples of _by_key's runs; the others are counted and logged."""
    for pos, key, parts in keyed:
        try:
            yield pos, _sample(key, parts)
        except _Unsound as e:
            setattr(stats, e.counter, getattr(stats, e.counter) + 1)
            log.warning("%s: %s: %s; sample skipped", url, key, e)


def visit(shard: Shard, rng: np.random.Generator, storage_options: dict | None, stats: StreamStats,
          retry: Retry, cache: ShardCache | None = None) -> Iterator[Sample]:
    """Every sample of one shard once, from the first group boundary after a random block, wrapping
    around. Starting at a group boundary keeps groups whole for cross-utterance views. What lies
    before that boundary is read again on the wrap-around and judged (counted, if unsound) there only:
    the sample cut by the entry point is incomplete by design."""
    f = _ShardFile(shard, storage_options, retry, stats, cache)
    try:
        entry = f.resync(BLOCK * int(rng.integers(max(1, f.size // BLOCK))))
        ahead = _by_key(f.members(entry, f.size))
        cut, wrap_at = None, f.size  # the first sound sample: its group may have begun before the entry
        for pos, key, parts in ahead:
            try:
                sample = _sample(key, parts)
            except _Unsound:
                continue
            if cut is None:
                cut = sample
            elif group_of(sample) != group_of(cut):
                wrap_at = pos
                yield sample
                break
        for _, sample in _judged(ahead, shard.url, stats):
            yield sample
        for _, sample in _judged(_by_key(f.members(0, wrap_at)), shard.url, stats):
            yield sample
    finally:
        f.close()


def sample_index(shard: Shard, sample: Sample) -> int:
    """The sample's global index: its shard's first plus its position, -1 when either is missing."""
    position = sample.meta.get("position")
    return shard.first + position if shard.first is not None and isinstance(position, int) else -1


def corpus_samples(corpus: Corpus, rng: np.random.Generator, storage_options: dict | None, strict: bool,
                   stats: StreamStats, retry: Retry, cache: ShardCache | None = None) -> Iterator[tuple[int, Sample]]:
    """An endless stream of (global index, sample) from random visits of the corpus's shards."""
    barren = 0  # consecutive visits that gave nothing: all shards broken must fail, not spin
    while True:
        shard = corpus.shards[int(rng.integers(len(corpus.shards)))]
        stats.shards_opened += 1
        got = 0
        try:
            for sample in visit(shard, rng, storage_options, stats, retry, cache):
                got += 1
                stats.samples_read += 1
                yield sample_index(shard, sample), sample
        except (OSError, CorruptShard) as e:
            if strict:
                raise
            stats.shards_skipped += 1
            log.warning("shard skipped (%d so far): %s: %s", stats.shards_skipped, shard.url, e)
        barren = 0 if got else barren + 1
        if barren > 10 + 2 * len(corpus.shards):
            raise RuntimeError(f"{corpus.spec}: no readable sample in {barren} shard visits in a row")


def mixed_samples(corpora: list[Corpus], weights: list[float], rng: np.random.Generator,
                  storage_options: dict | None, strict: bool, stats: StreamStats,
                  retry: Retry = Retry(), cache: ShardCache | None = None) -> Iterator[tuple[int, Sample]]:
    """(Global index, sample) drawn from the corpora with the given probabilities, one choice per
    sample; shards read through the node's `cache` when one is given (shards/cache.py)."""
    streams = [corpus_samples(c, rng, storage_options, strict, stats, retry, cache) for c in corpora]
    try:
        if len(streams) == 1:
            yield from streams[0]
            return
        cumulative = np.cumsum(weights)
        while True:
            i = min(int(np.searchsorted(cumulative, rng.random(), side="right")), len(streams) - 1)
            yield next(streams[i])
    finally:
        for s in streams:
            s.close()
