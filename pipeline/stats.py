"""What a stream counts, in one place: each counter and what it means, and how the loader adds them up.

A stream bumps its own StreamStats per sample and sends a copy with every batch (pickled, from a
worker process). The class has slots and no instance dict, so a misspelt counter raises
AttributeError where it is bumped instead of becoming a new key that nothing reads.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable


@dataclass(slots=True)
class StreamStats:
    shards_opened: int = 0        # shard visits begun
    shards_skipped: int = 0       # visits given up because the shard could not be read (logged with its URL)
    retries: int = 0              # shard opens and reads retried after a transient storage error (each logged)
    samples_read: int = 0         # complete samples read from shards
    samples_skipped: int = 0      # samples with bad metadata or a FLAC that does not hold what it announces
    samples_incomplete: int = 0   # samples lacking their .flac or .json member (logged with the shard's URL)
    samples_corrupt: int = 0      # samples whose FLAC bytes fail the crc32 recorded at sharding (logged)
    short_skipped: int = 0        # utterances under data.min_duration
    short_padded: int = 0         # views longer than their utterance, filled by repeating it
    unlabeled: int = 0            # utterances skipped because data.labels has no label for them
    cross_items: int = 0          # items made in cross-utterance mode
    fallbacks: int = 0            # of those, the ones whose group had no other usable utterance
    batches: int = 0
    pairs: int = 0                # items delivered in batches (training pairs, or multi-crop tuples)
    storage_requests: int = 0     # read requests that reached storage (ranges of an object store, reads of a file)
    storage_bytes: int = 0        # bytes those requests returned (a cached shard's reads are not counted)
    crop_bytes: float = 0.0       # compressed bytes the crops span: each crop's share of its utterance's FLAC
    dup_group_batches: int = 0    # batches holding two items of one group: false negatives for a contrastive loss
    cpu_seconds: float = 0.0      # the stream's process CPU time
    # The peaks below are the largest over streams, not sums: each worker's own memory (the trainer's
    # own without workers).
    peak_rss_mb: float = 0.0      # resident (VmHWM), pages shared with other processes included
    peak_pss_mb: float = 0.0      # proportional: each shared page split among the processes that map it
    peak_private_mb: float = 0.0  # held by the process alone


PEAKS = ("peak_rss_mb", "peak_pss_mb", "peak_private_mb")


def data_path(storage_requests: float, storage_bytes: float, crop_bytes: float, pairs: float) -> dict[str, float]:
    """What the data path costs storage: requests and bytes per pair, and read amplification, the
    bytes read against the crop bytes used (1 would read only what the crops span)."""
    return {"storage_requests": storage_requests, "storage_bytes": storage_bytes,
            "requests_per_pair": storage_requests / max(1, pairs), "bytes_per_pair": storage_bytes / max(1, pairs),
            "read_amplification": storage_bytes / max(1.0, crop_bytes)}


def summary(streams: Iterable[StreamStats]) -> dict:
    """Every field over the streams (summed, or the largest for the peaks), with the rates the trainer
    logs, and the data path's figures over all streams and for each (`workers`, one entry a stream)."""
    streams = list(streams)
    out: dict = {}
    for name in (f.name for f in fields(StreamStats)):
        values = [getattr(s, name) for s in streams]
        out[name] = max(values, default=0.0) if name in PEAKS else sum(values)
    out["dup_group_rate"] = out["dup_group_batches"] / max(1, out["batches"])
    out["fallback_rate"] = out["fallbacks"] / max(1, out["cross_items"])
    costs = ("storage_requests", "storage_bytes", "crop_bytes", "pairs")
    out.update(data_path(*(out[k] for k in costs)))
    out["workers"] = [data_path(*(getattr(s, k) for k in costs)) for s in streams]
    return out
