"""Where training shards come from: URL specs resolved to shard lists, and a fork-safe opener.

A spec is a shard-set prefix (its manifest lists the shards and their sizes), a brace pattern
(`s3://b/vox-{000000..000099}.tar`, several joined by `::`), a single `.tar` URL, or a list of these. Several specs can be
mixed with weights: each is one corpus. Any URL may be an fsspec chain (`simplecache::s3://b/set`): in a
pattern spec, `::` after a bare protocol name (letters, digits, `_`: `simplecache`, `filecache`) chains
that layer onto the URL after it; every other `::` separates two patterns (split_patterns).

Global index. With a manifest, every utterance has a stable global index: its shard's `first` (the
samples of the shards before it in the manifest, after those of the manifest corpora listed before
it in data.train) plus its `position` in the shard (shards/format.py), so mixed corpora get disjoint
ranges within `[0, index_size)`. A spec without a manifest gives no index (`first` None).

Filesystem objects (s3fs clients, ...) are made lazily in the process that uses them and cached per
process id, so no process uses a client whose connections and event loop belong to its parent.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from itertools import accumulate
from typing import IO, Callable

import fsspec
from braceexpand import braceexpand

from voxstream.shards import format as shard_format
from voxstream.shards.cache import CHUNK, ShardCache
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


_LAYER = re.compile(r"[A-Za-z0-9_]+")


def split_patterns(spec: str) -> list[str]:
    """The patterns of a spec joined by `::`, each keeping the fsspec layers chained in front of it:
    `simplecache::s3://b/a-{0..3}.tar::s3://b/b.tar` -> [`simplecache::s3://b/a-{0..3}.tar`, `s3://b/b.tar`]."""
    patterns, layers = [], []
    for part in spec.split("::"):
        if _LAYER.fullmatch(part):
            layers.append(part)
        else:
            patterns.append("::".join([*layers, part]))
            layers = []
    if layers or not patterns:
        raise ValueError(f"{spec}: ends with the fsspec layer {'::'.join(layers)}:: and no URL after it")
    return patterns


def resolve(spec: str, storage_options: dict | None = None, first: int = 0) -> Corpus:
    """The shards of one spec: a prefix with a manifest, a brace pattern, or one tar URL. `first`:
    the global index of the manifest's first sample."""
    if spec.endswith(".tar") or "{" in spec:
        urls = [url for pattern in split_patterns(spec) for url in braceexpand(pattern)]
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
    chain = storage.protocols(url)
    key = (os.getpid(), *chain, repr(sorted((storage_options or {}).items())))
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        for protocol in chain:
            cls = fsspec.get_filesystem_class(protocol)
            if getattr(cls, "_pid", os.getpid()) != os.getpid():
                _INHERITED.extend(getattr(cls, "_cache", {}).values())
        options = {**(storage_options or {}), "skip_instance_cache": True}
        options.update({layer: {**options.get(layer, {}), "skip_instance_cache": True} for layer in chain[:-1]})
        fs, _ = storage.filesystem(url, options)
        _FILESYSTEMS[key] = fs
    return fs, fs._strip_protocol(url)


def open_shard(url: str, storage_options: dict | None = None, block_size: int = 8 << 20,
               on_fetch: Callable[[int], None] | None = None, cache: ShardCache | None = None,
               sha256: str | None = None) -> IO[bytes]:
    """A seekable binary file for a shard URL; object stores read ahead in `block_size` ranges.
    `on_fetch(bytes)` is called for each request that reaches storage (storage.counted). With a
    `cache`, a shard not on a local path is read from the node's copy (shards/cache.py), copied
    first when the node has none: a cached shard reads nothing from storage. `sha256`: its
    manifest's, naming the copy."""
    fs, path = _filesystem(url, storage_options)

    def source(**kwargs) -> IO[bytes]:
        f = fs.open(path, "rb", **kwargs)
        return storage.counted(f, on_fetch) if on_fetch else f

    if storage.is_local(url):
        return source()
    if cache is not None:
        copy = cache.open(url, sha256, lambda: source(block_size=CHUNK, cache_type="none"))
        if copy is not None:
            return copy
    return source(block_size=block_size, cache_type="readahead")

