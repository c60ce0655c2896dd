"""Check a shard set against its manifest by re-reading every sample.

Per shard: size and sha256, one .flac and one .json per key, the key derived from the metadata,
16 kHz mono 16-bit FLAC that decodes to num_samples frames of the stated duration, each sample's
position and FLAC crc32, contiguous groups, and the counts the manifest states. Across shards: unique keys, groups split only between
neighbouring shards, no stray shard of the same prefix outside the manifest.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import soundfile as sf

from voxstream.shards import storage
from voxstream.shards.format import META_FIELDS, SAMPLE_RATE, flac_intact, iter_tar, read_manifest, sample_key


@dataclass
class ShardReport:
    name: str
    problems: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)  # in order, one entry per run of a group
    seconds: float = 0.0


@dataclass
class Report:
    url: str
    problems: list[str] = field(default_factory=list)
    shards: int = 0
    samples: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def check_shard(url: str, record: dict, corpus: str, storage_options: dict | None = None) -> ShardReport:
    """Re-read one shard completely and compare it with its manifest record."""
    report = ShardReport(record["name"])
    bad = report.problems.append
    try:
        data = storage.read_bytes(url, storage_options)
    except (OSError, ValueError) as e:
        bad(f"{record['name']}: unreadable: {e}")
        return report
    if len(data) != record["bytes"]:
        bad(f"{record['name']}: {len(data)} bytes, manifest says {record['bytes']}")
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        bad(f"{record['name']}: sha256 differs from the manifest")
    try:
        for key, members in iter_tar(io.BytesIO(data)):
            _check_sample(key, members, corpus, report)
    except Exception as e:  # a truncated or garbled tar: report it, keep verifying the others
        bad(f"{record['name']}: not a readable tar after {len(report.keys)} samples: {e}")
    counts = {"samples": len(report.keys), "groups": len(report.groups), "seconds": round(report.seconds, 3)}
    for name, value in counts.items():
        if abs(value - record[name]) > (0.01 if name == "seconds" else 0):
            bad(f"{record['name']}: {value} {name}, manifest says {record[name]}")
    if len(set(report.groups)) != len(report.groups):
        bad(f"{record['name']}: groups not contiguous")
    return report


def _check_sample(key: str, members: dict[str, bytes], corpus: str, report: ShardReport) -> None:
    bad = lambda msg: report.problems.append(f"{report.name}: {key}: {msg}")  # noqa: E731
    report.keys.append(key)
    if sorted(members) != ["flac", "json"]:
        return bad(f"members {sorted(members)}, expected flac and json")
    try:
        meta = json.loads(members["json"])
    except ValueError as e:
        return bad(f"metadata is not JSON: {e}")
    if not isinstance(meta, dict):
        return bad(f"metadata is not a JSON object: {meta!r:.40}")
    # Sets written before samples recorded their position and crc32 stay valid.
    if missing := [f for f in META_FIELDS if f not in meta and f not in ("position", "crc32")]:
        return bad(f"metadata lacks {missing}")
    if not flac_intact(meta, members["flac"]):
        return bad("FLAC bytes fail their crc32")
    if "position" in meta and meta["position"] != len(report.keys) - 1:
        bad(f"position {meta['position']}, but sample {len(report.keys) - 1} of its shard")
    if not report.groups or report.groups[-1] != meta["group"]:
        report.groups.append(meta["group"])
    report.seconds += meta["duration"]
    if meta["corpus"] != corpus or key != sample_key(corpus, meta["speaker"], meta["session"], meta["utt"]):
        bad(f"key does not match its metadata (corpus {meta['corpus']!r}, utt {meta['utt']!r})")
    try:
        with sf.SoundFile(io.BytesIO(members["flac"])) as f:
            audio = (f.format, f.subtype, f.samplerate, f.channels)
            frames = len(f.read(dtype="int16"))
    except Exception as e:
        return bad(f"FLAC does not decode: {e}")
    if audio != ("FLAC", "PCM_16", SAMPLE_RATE, 1):
        bad(f"audio is {audio}, expected FLAC PCM_16 {SAMPLE_RATE} Hz mono")
    if frames != meta["num_samples"] or meta["sample_rate"] != SAMPLE_RATE:
        bad(f"decodes to {frames} samples, metadata says {meta['num_samples']} at {meta['sample_rate']} Hz")
    if abs(meta["duration"] - frames / SAMPLE_RATE) > 1e-3:
        bad(f"duration {meta['duration']} s, audio is {frames / SAMPLE_RATE} s")


def verify(url: str, storage_options: dict | None = None, workers: int = 1) -> Report:
    """Re-read a whole shard set; the report lists every mismatch (empty when the set is sound)."""
    report = Report(url)
    try:
        manifest = read_manifest(url, storage_options)
    except (FileNotFoundError, ValueError, KeyError) as e:
        report.problems.append(str(e))
        return report
    jobs = [(storage.join(url, s["name"]), s, manifest.corpus, storage_options) for s in manifest.shards]
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            shard_reports = list(pool.map(check_shard, *zip(*jobs))) if jobs else []
    else:
        shard_reports = [check_shard(*job) for job in jobs]
    for shard in shard_reports:
        report.problems += shard.problems
        report.seconds += shard.seconds
    report.shards, report.samples = len(shard_reports), sum(len(s.keys) for s in shard_reports)
    report.problems += _check_across_shards(shard_reports)
    report.problems += _stray_shards(url, manifest.prefix, [s["name"] for s in manifest.shards], storage_options)
    return report


def _check_across_shards(shards: list[ShardReport]) -> list[str]:
    problems, seen_keys, group_home = [], set(), {}
    for i, shard in enumerate(shards):
        for key in shard.keys:
            if key in seen_keys:
                problems.append(f"{shard.name}: {key}: key repeated from an earlier shard")
            seen_keys.add(key)
        for j, group in enumerate(shard.groups):
            # a group may continue from the previous shard only as its last and this shard's first group
            continues = j == 0 and i > 0 and shards[i - 1].groups[-1:] == [group]
            if group in group_home and not continues:
                problems.append(f"{shard.name}: group {group} also in {group_home[group]}, not contiguous")
            group_home.setdefault(group, shard.name)
    return problems


def _stray_shards(url: str, prefix: str, names: list[str], storage_options: dict | None) -> list[str]:
    fs, path = storage.filesystem(url, storage_options)
    pattern = re.compile(re.escape(prefix) + r"-\d{6}\.tar$")
    listed = {p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False, refresh=True)}
    return [f"{name}: shard of prefix {prefix} not in the manifest" for name in sorted(listed - set(names))
            if pattern.match(name)]
