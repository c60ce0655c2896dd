"""Positive views: int16 crops of one utterance, or of several utterances of one group.

Crops are read by seeking into the FLAC, never by decoding the whole utterance: one open per
utterance, one seek per span, where overlapping or nearly touching crops share one span.

Short utterances (the documented rule): an utterance under `min_duration` seconds is skipped
(`stats.short_skipped`); one at least that long but shorter than a view fills that view by
repetition, starting at a random point (`stats.short_padded` counts such views).

Cross-utterance views: the views of an item come from different utterances of its group (cycling
through them when the group has fewer utterances than views). A group reduced to one usable
utterance falls back to same-utterance views (`stats.fallbacks`, out of `stats.cross_items`).
Groups are taken as they appear in the stream (contiguous in a shard) and cut into runs of at most
MAX_GROUP utterances so that one huge group cannot hold unbounded FLAC bytes.

Reference crop (`reference` frames > 0, for SSPS): one more crop per item, always from the item's
own utterance (the anchor, cross-utterance), kept apart from the views (`TrainingItem.reference`)
so that CPU augmentation, which runs on the views, leaves it clean. Items carry their utterance's
global index and speaker (monitoring only), the anchor's in cross-utterance mode.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import groupby
from typing import Iterable, Iterator, NamedTuple

import numpy as np
from miniaudio import ffi as _ffi, lib as _dr

from voxstream.pipeline.stats import StreamStats
from voxstream.pipeline.stream import group_of
from voxstream.shards.format import SAMPLE_RATE, Sample
from voxstream.shards.labels import Labels

log = logging.getLogger(__name__)
MAX_GROUP = 64
# Crops closer than this are decoded as one span, gap included: with dr_flac a seek costs about as
# much as decoding a few thousand samples (two 2-s crops from LibriSpeech: 0.48-0.50 ms a pair for
# gaps of 0-4,096, 0.53 ms at 8,192, 0.61 ms at 16,000).
SEEK_GAP = 4096


@dataclass
class TrainingItem:
    """What the loader batches: the positive views of one utterance (of its group, cross-utterance)."""
    key: str
    group: str
    views: list[np.ndarray]  # int16, one per view length
    label: int = -1  # its (pseudo-)speaker from data.labels; -1 without labels
    index: int = -1  # global index of its utterance (pipeline/sources.py); -1 without one
    speaker: str = ""  # from the metadata ("" without one): for monitoring, never for training
    reference: np.ndarray | None = None  # int16 clean crop of its own utterance, when asked for


class Utterance(NamedTuple):
    """A sample the views can use: its group and length read from the metadata."""
    key: str
    group: str
    flac: bytes
    length: int  # samples
    label: int = -1
    index: int = -1
    speaker: str = ""


class CorruptSample(ValueError):
    """The FLAC does not hold the samples its metadata announces."""


def view_frames(seconds: list[float]) -> list[int]:
    return [int(round(s * SAMPLE_RATE)) for s in seconds]


def read_spans(key: str, flac: bytes, spans: list[tuple[int, int]]) -> list[np.ndarray]:
    """int16 samples of (start, frames) spans, in increasing start order, from one open of the FLAC.

    Same samples as shards.format.decode_audio per span, decoded by dr_flac (bundled with miniaudio)
    straight from memory: two 2-s crops cost a third of what libsndfile takes through soundfile,
    whose seeks decode several frames and whose reads call back into Python for every block.
    """
    decoder = _dr.ma_dr_flac_open_memory(flac, len(flac), _ffi.NULL)
    if decoder == _ffi.NULL:
        raise CorruptSample(f"{key}: not a FLAC stream")
    out, pos = [], 0
    try:
        if decoder.channels != 1 or decoder.bitsPerSample != 16:  # the read below writes frames x channels
            raise CorruptSample(f"{key}: {decoder.channels} channels of {decoder.bitsPerSample} bits, expected mono 16-bit")
        for start, frames in spans:
            if start != pos and not _dr.ma_dr_flac_seek_to_pcm_frame(decoder, start):
                raise CorruptSample(f"{key}: cannot seek to sample {start}")
            wave = np.empty(frames, dtype=np.int16)
            got = _dr.ma_dr_flac_read_pcm_frames_s16(decoder, frames, _ffi.cast("ma_dr_flac_int16 *", wave.ctypes.data))
            if got != frames:
                raise CorruptSample(f"{key}: {got} samples at {start}, expected {frames}")
            out.append(wave)
            pos = start + frames
    finally:
        _dr.ma_dr_flac_close(decoder)
    return out


def crops(utterance: Utterance, frames: list[int], rng: np.random.Generator, stats: StreamStats) -> list[np.ndarray]:
    """One crop per entry of `frames` at independent random offsets of the utterance."""
    key, flac, length = utterance.key, utterance.flac, utterance.length
    stats.crop_bytes += len(flac) * sum(min(f, length) for f in frames) / length
    starts = [int(rng.integers(length - f + 1)) if f <= length else -1 for f in frames]
    out: list[np.ndarray | None] = [None] * len(frames)
    if min(starts) < 0:  # some view is longer than the utterance: repeat it
        whole = read_spans(key, flac, [(0, length)])[0]
        for i, f in enumerate(frames):
            if starts[i] < 0:
                stats.short_padded += 1
                out[i] = np.take(whole, np.arange(f) + int(rng.integers(length)), mode="wrap")
            else:
                out[i] = whole[starts[i]:starts[i] + f]
        return out
    # Runs of crops that overlap (or nearly touch) are decoded once as one span.
    runs: list[tuple[int, int, list[int]]] = []  # (first sample, end, crops in it)
    for i in sorted(range(len(frames)), key=starts.__getitem__):
        if runs and starts[i] < runs[-1][1] + SEEK_GAP:
            lo, hi, members = runs[-1]
            runs[-1] = (lo, max(hi, starts[i] + frames[i]), members + [i])
        else:
            runs.append((0 if starts[i] < SEEK_GAP else starts[i], starts[i] + frames[i], [i]))
    spans = read_spans(key, flac, [(lo, hi - lo) for lo, hi, _ in runs])
    for (lo, _, members), span in zip(runs, spans):
        for j in members:
            out[j] = span[starts[j] - lo:starts[j] - lo + frames[j]]
    return out


def _length(sample: Sample) -> int:
    try:
        return int(sample.meta["num_samples"])
    except (KeyError, TypeError, ValueError):
        raise CorruptSample(f"{sample.key}: metadata has no num_samples") from None


def _usable(samples: Iterable[tuple[int, Sample]], min_frames: int, labels: Labels | None,
            stats: StreamStats) -> Iterator[Utterance]:
    """Samples with a length, long enough and, with `labels`, labelled: the label is then the group."""
    for index, sample in samples:
        try:
            length = _length(sample)
        except CorruptSample as e:
            stats.samples_skipped += 1
            log.warning("sample skipped: %s", e)
            continue
        if length < min_frames:
            stats.short_skipped += 1
            continue
        speaker = str(sample.meta.get("speaker") or "")
        if labels is None:
            yield Utterance(sample.key, group_of(sample), sample.flac, length, -1, index, speaker)
            continue
        label = labels.lookup(sample.key)
        if label < 0:
            stats.unlabeled += 1
            continue
        yield Utterance(sample.key, f"label-{label}", sample.flac, length, label, index, speaker)


def _item(utterance: Utterance, cut: list[np.ndarray], views: int) -> TrainingItem:
    """The item of an utterance (the anchor), from its views' crops and then its reference crop, if any."""
    reference = cut[views] if len(cut) > views else None
    return TrainingItem(utterance.key, utterance.group, cut[:views], utterance.label, utterance.index,
                        utterance.speaker, reference)


def same_utterance(samples: Iterable[tuple[int, Sample]], frames: list[int], min_frames: int,
                   labels: Labels | None, rng: np.random.Generator, stats: StreamStats,
                   reference: int = 0) -> Iterator[TrainingItem]:
    """One item per utterance, its views (and `reference` frames of clean crop, if > 0) all from it."""
    all_frames = frames + [reference] if reference else frames
    for utterance in _usable(samples, min_frames, labels, stats):
        try:
            views = crops(utterance, all_frames, rng, stats)
        except CorruptSample as e:
            stats.samples_skipped += 1
            log.warning("sample skipped: %s", e)
            continue
        yield _item(utterance, views, len(frames))


def _group_runs(usable: Iterable[Utterance]) -> Iterator[list[Utterance]]:
    for _, run in groupby(usable, key=lambda u: u.group):
        run = list(run)
        for i in range(0, len(run), MAX_GROUP):
            yield run[i:i + MAX_GROUP]


def cross_utterance(samples: Iterable[tuple[int, Sample]], frames: list[int], min_frames: int,
                    labels: Labels | None, rng: np.random.Generator, stats: StreamStats,
                    reference: int = 0) -> Iterator[TrainingItem]:
    """One item per utterance of each group: its first view (and its reference crop) from it, the
    other views from the rest of the group."""
    all_frames = frames + [reference] if reference else frames
    for run in _group_runs(_usable(samples, min_frames, labels, stats)):
        for anchor in range(len(run)):
            stats.cross_items += 1
            others = [i for i in range(len(run)) if i != anchor]
            if not others:
                stats.fallbacks += 1
            source = [anchor, *rng.permutation(others).tolist()] if others else [anchor]
            wanted: dict[int, list[int]] = {}
            for v in range(len(frames)):
                wanted.setdefault(source[v % len(source)], []).append(v)
            if reference:
                wanted[anchor].append(len(frames))
            views: list[np.ndarray | None] = [None] * len(all_frames)
            try:
                for u, vs in wanted.items():
                    for v, crop in zip(vs, crops(run[u], [all_frames[v] for v in vs], rng, stats)):
                        views[v] = crop
            except CorruptSample as e:
                stats.samples_skipped += 1
                log.warning("sample skipped: %s", e)
                continue
            yield _item(run[anchor], views, len(frames))
