"""A node-local shard cache: whole shards copied once from storage into a folder that every rank and
loader worker of a node shares, bounded in size, least-recently-used shards evicted first.

Why not fsspec's caching layers (`simplecache::`, `filecache::`, `blockcache::`): none bounds its size
(only an expiry time), so none evicts by use, and none is safe for many processes filling one folder:
simplecache and filecache download straight under the final name, which another process already takes
for a cached copy (a torn read), and filecache and blockcache keep one metadata file that each
process rewrites from its own view. They remain usable as chained URLs (shards/storage.py); this cache
is what `data.cache_dir` turns on.

How it stays correct with many processes:
- A shard appears under its name only whole: it is downloaded to a temporary file, its size checked
  against the object's, and renamed into place (os.replace is atomic), so a reader sees the whole
  shard or none, and a download cut short is never used (its temporary file is swept later).
- One process downloads a shard while the others wanting it wait on a lock file (flock, released by
  the kernel if its holder dies), then find it published.
- A cached shard's modification time is its last use (touched on every hit, once open); after each download the
  oldest shards are deleted until the published ones fit `max_bytes`. A reader that opened a shard
  before it was evicted keeps reading it: the file lives on until closed.

Entries are named by a hash of the source URL and its manifest checksum (when known), so a shard set
rewritten under the same URLs with a new manifest never serves stale bytes.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import time
import uuid
from dataclasses import dataclass
from typing import IO, Callable

_STALE_TMP_S = 3600.0  # a temporary file this old belongs to a download that died
CHUNK = 8 << 20  # bytes per read of a download: one range request each


@dataclass(frozen=True)
class ShardCache:
    root: str
    max_bytes: int

    def entry(self, url: str, sha256: str | None = None) -> str:
        """The cache path of a shard (present or not)."""
        digest = hashlib.sha256(f"{url}\n{sha256 or ''}".encode()).hexdigest()[:32]
        return os.path.join(self.root, f"{digest}-{url.rsplit('/', 1)[-1]}")

    def open(self, url: str, sha256: str | None, open_source: Callable[[], IO[bytes]]) -> IO[bytes] | None:
        """The node's whole copy of the shard at `url`, open for reading, copied first from
        `open_source()` (a seekable file of the shard) if it is not cached; None when the
        shard is larger than the whole cache (read it from storage instead)."""
        path = self.entry(url, sha256)
        if cached := _open_used(path):
            return cached
        os.makedirs(os.path.join(self.root, "tmp"), exist_ok=True)
        with open(os.path.join(self.root, "tmp", os.path.basename(path) + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if cached := _open_used(path):  # another process published it while this one waited
                return cached
            with open_source() as source:
                size = source.seek(0, os.SEEK_END)
                if size > self.max_bytes:
                    return None
                source.seek(0)
                self._copy(source, size, path, url)
                copy = open(path, "rb")  # before evicting: open, it cannot be evicted from under its reader
        self.evict(keep=path)
        return copy

    def _copy(self, source: IO[bytes], size: int, path: str, url: str) -> None:
        """Publish a whole copy of `source` at `path`, or nothing."""
        tmp = os.path.join(self.root, "tmp", f"{os.path.basename(path)}.{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as out:
                while chunk := source.read(CHUNK):
                    out.write(chunk)
            if os.path.getsize(tmp) != size:
                raise OSError(f"{url}: copied {os.path.getsize(tmp)} of {size} bytes")
            os.replace(tmp, path)
        finally:
            _remove(tmp)

    def evict(self, keep: str | None = None) -> None:
        """Delete the least recently used shards until the cached ones fit max_bytes (never `keep`), and
        temporary files of downloads that died."""
        entries = []
        with os.scandir(self.root) as found:
            for e in found:
                try:
                    if e.is_file():
                        entries.append((e.stat().st_mtime, e.stat().st_size, e.path))
                except FileNotFoundError:  # evicted by another process meanwhile
                    pass
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path != keep:
                _remove(path)
                total -= size
        stale = time.time() - _STALE_TMP_S
        with os.scandir(os.path.join(self.root, "tmp")) as found:
            for e in found:
                if not e.name.endswith(".lock") and _mtime(e.path) < stale:
                    _remove(e.path)


def _open_used(path: str) -> IO[bytes] | None:
    """A cached shard, open and marked used now; None when it is not cached. Opened before it is
    touched: once open, eviction cannot take it from its reader."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    os.utime(f.fileno())
    return f


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except FileNotFoundError:
        return float("inf")


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
