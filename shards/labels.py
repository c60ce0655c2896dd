"""Labels beside a shard set: utterance key -> pseudo-speaker, joined in the loader without rewriting audio.

A labels file is one .npz written atomically, its rows sorted by `hashes` (a stable 63-bit hash of
each key): `keys` (bytes), `hashes` (int64), `labels` (int32) and `info` (JSON: how the labels were
made, their statistics, and the shards of the set they describe, so a file made for another set is
refused). The loader workers read only `hashes` and `labels`, 12 bytes a key (13 MB for VoxCeleb2's
1.1 M utterances, where a dict of the key strings would hold about 150 MB in every worker), and look
a key up by bisection.

Nothing here imports torch: the loader workers use it.
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass

import numpy as np

from voxstream.shards import storage


def stable_hash(text: str) -> int:
    """A 63-bit hash of a string, the same in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


def write_labels(url: str, keys: list[str], labels: np.ndarray, info: dict,
                 storage_options: dict | None = None) -> None:
    """Write a labels file atomically: it appears complete or not at all."""
    labels = np.asarray(labels, dtype=np.int32)
    hashes = np.fromiter((stable_hash(k) for k in keys), dtype=np.int64, count=len(keys))
    if len(keys) != len(labels):
        raise ValueError(f"{url}: {len(keys)} keys but {len(labels)} labels")
    order = np.argsort(hashes, kind="stable")
    if np.any(hashes[order][1:] == hashes[order][:-1]):
        raise ValueError(f"{url}: repeated keys (or two keys with one 64-bit hash)")
    buf = io.BytesIO()
    np.savez(buf, keys=np.array(keys, dtype=bytes)[order], hashes=hashes[order], labels=labels[order],
             info=np.array(json.dumps(info)))
    storage.write_bytes(url, buf.getvalue(), storage_options)


@dataclass
class Labels:
    hashes: np.ndarray        # int64, sorted
    labels: np.ndarray        # int32, one per hash
    info: dict
    keys: np.ndarray | None = None  # bytes, one per hash; read only when asked for

    def lookup(self, key: str) -> int:
        """The key's label, or -1 when the file has none for it."""
        h = stable_hash(key)
        i = int(np.searchsorted(self.hashes, h))
        return int(self.labels[i]) if i < len(self.hashes) and self.hashes[i] == h else -1


def read_labels(url: str, storage_options: dict | None = None, keys: bool = False) -> Labels:
    """A labels file, its keys too when `keys`; a missing or malformed file is one error naming it."""
    fs, path = storage.filesystem(url, storage_options)
    try:
        with fs.open(path, "rb") as f, np.load(f, allow_pickle=False) as npz:  # reads only the members asked for
            return Labels(npz["hashes"], npz["labels"], json.loads(str(npz["info"])),
                          np.char.decode(npz["keys"]) if keys else None)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: labels file not found") from None
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{url}: not a labels file ({e})") from None
