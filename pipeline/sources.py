"""Where training shards come from: URL specs resolved to shard lists, and a fork-safe opener.

A spec is a shard-set prefix (its manifest lists the shards and their sizes), a brace pattern
(`s3://b/vox-{000000..000099}.tar`, several joined by `::`), a single `.tar` URL, or a list of these. Several specs can be
mixed with weights: each is one corpus.

Global index. With a manifest, every utterance has a stable global index: its shard's `first` (the
samples of the shards before it in the manifest, after those of the manifest corpora listed before
it in data.train) plus its `position` in the shard (shards/format.py), so mixed corpora get disjoint
ranges within `[0, index_size)`. A spec without a manifest gives no index (`first` None).

Filesystem objects (s3fs clients, ...) are made lazily in the process that uses them and cached per
process id, so no process uses a client whose connections and event loop belong to its parent.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import accumulate
from typing import IO

import fsspec
from braceexpand import braceexpand

from voxstream.shards import format as shard_format
from voxstream.shards import storage


@dataclass(frozen=True)
class Shard:
    url: str
    size: int | None = None  # bytes, from the manifest; None when the spec named the shard directly
    sha256: str | None = None  # from the manifest, likewise
    first: int | None = None  # global index of its first sample; None without a manifest


@dataclass(frozen=True)
class Corpus:
    spec: str
    shards: tuple[Shard, ...]
    samples: int | None = None  # from the manifest; None without one


def resolve(spec: str, storage_options: dict | None = None, first: int = 0) -> Corpus:
    """The shards of one spec: a prefix with a manifest, a brace pattern, or one tar URL. `first`:
    the global index of the manifest's first sample."""
    if spec.endswith(".tar") or "{" in spec:
        urls = [url for pattern in spec.split("::") for url in braceexpand(pattern)]
        return Corpus(spec, tuple(Shard(u) for u in urls))
    manifest = shard_format.read_manifest(spec, storage_options)
    firsts = accumulate((s["samples"] for s in manifest.shards), initial=first)
    shards = tuple(Shard(storage.join(spec, s["name"]), s.get("bytes"), s.get("sha256"), start)
                   for s, start in zip(manifest.shards, firsts))
    if not shards:
        raise ValueError(f"{spec}: manifest lists no shards")
    return Corpus(spec, shards, manifest.samples)


def resolve_all(specs: str | list[str], weights: list[float] | None,
                storage_options: dict | None = None) -> tuple[list[Corpus], list[float]]:
    """Corpora and their normalised mixing weights (equal when `weights` is None)."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise ValueError("data.train: no shard source given")
    weights = [1.0] * len(specs) if weights is None else list(weights)
    if len(weights) != len(specs) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"data.weights {weights}: need one non-negative weight per source ({len(specs)})")
    corpora: list[Corpus] = []
    for spec in specs:
        corpora.append(resolve(spec, storage_options, sum(c.samples or 0 for c in corpora)))
    total = sum(weights)
    return corpora, [w / total for w in weights]


def index_size(corpora: list[Corpus]) -> int | None:
    """How many global indices the corpora span (the samples of their manifests); None when one has none."""
    if any(c.samples is None for c in corpora):
        return None
    return sum(c.samples for c in corpora)


_FILESYSTEMS: dict[tuple, fsspec.AbstractFileSystem] = {}
# Instances a forked worker inherited from fsspec's cache. fsspec drops them when the child makes its
# first instance, and s3fs's finalizer would then try to close them on the parent's event loop, which
# does not run in the child (errors, and a 0.1 s stall each): keeping them alive means never closing them.
_INHERITED: list[fsspec.AbstractFileSystem] = []


def _filesystem(url: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """A filesystem made in this process (keyed by pid: never one inherited across a fork)."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    key = (os.getpid(), protocol, repr(sorted((storage_options or {}).items())))
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        cls = fsspec.get_filesystem_class(protocol)
        if getattr(cls, "_pid", os.getpid()) != os.getpid():
            _INHERITED.extend(getattr(cls, "_cache", {}).values())
        options = {**(storage_options or {}), "skip_instance_cache": True}
        fs, _ = storage.filesystem(url, options)
        _FILESYSTEMS[key] = fs
    return fs, fs._strip_protocol(url)


def open_shard(url: str, storage_options: dict | None = None, block_size: int = 8 << 20) -> IO[bytes]:
    """A seekable binary file for a shard URL; object stores read ahead in `block_size` ranges."""
    fs, path = _filesystem(url, storage_options)
    if storage.is_local(url):
        return fs.open(path, "rb")
    return fs.open(path, "rb", block_size=block_size, cache_type="readahead")

