"""Labels beside a shard set: utterance key -> pseudo-speaker, joined in the loader without rewriting audio.

A labels file is one .npz written atomically: `keys` (sorted sample keys), `labels` (int32, one per
key) and `info` (JSON: how the labels were made, their statistics, and the shards of the set they
describe, so a file made for another set is refused). The loader workers keep only a sorted 64-bit
hash of each key and its label, 12 bytes a key (13 MB for VoxCeleb2's 1.1 M utterances, where a
dict of the key strings would take about 150 MB in every worker), and look keys up by bisection.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np

from voxstream.shards import storage


def key_hash(key: str) -> int:
    """A 63-bit hash of a string, the same in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


def _hashes(keys: list[str]) -> np.ndarray:
    return np.fromiter((key_hash(k) for k in keys), dtype=np.int64, count=len(keys))


def write_labels(url: str, keys: list[str], labels: np.ndarray, info: dict,
                 storage_options: dict | None = None) -> None:
    """Write a labels file atomically: it appears complete or not at all."""
    keys = np.asarray(keys, dtype=str)
    labels = np.asarray(labels, dtype=np.int32)
    if keys.shape != labels.shape or len(np.unique(keys)) != len(keys):
        raise ValueError(f"{url}: need one label per key and unique keys ({len(keys)} keys, {len(labels)} labels)")
    order = np.argsort(keys)
    buf = io.BytesIO()
    np.savez(buf, keys=keys[order], labels=labels[order], info=np.array(json.dumps(info)))
    storage.write_bytes(url, buf.getvalue(), storage_options)


@dataclass
class Labels:
    keys: np.ndarray    # sorted str
    labels: np.ndarray  # int32, aligned with keys
    info: dict


def read_labels(url: str, storage_options: dict | None = None) -> Labels:
    """The whole file; a missing or malformed one is one error naming it."""
    try:
        data = storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: labels file not found") from None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            return Labels(f["keys"], f["labels"], json.loads(str(f["info"])))
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"{url}: not a labels file ({e})") from None


class LabelIndex:
    """Sorted key hashes and their labels: `lookup(key)` is the key's label, or -1 when it has none."""

    def __init__(self, labels: Labels):
        hashes = _hashes(labels.keys.tolist())
        order = np.argsort(hashes)
        self.hashes, self.labels, self.info = hashes[order], labels.labels[order], labels.info
        if np.any(self.hashes[1:] == self.hashes[:-1]):
            raise ValueError("labels: two keys share a 64-bit hash; rename one")

    def __len__(self) -> int:
        return len(self.hashes)

    def lookup(self, key: str) -> int:
        h = key_hash(key)
        i = int(np.searchsorted(self.hashes, h))
        return int(self.labels[i]) if i < len(self.hashes) and self.hashes[i] == h else -1
