"""Write a corpus listing as WebDataset shards: a deterministic plan, parallel encoding, resumable.

The plan: groups (sessions) in a global order shuffled by the seed, the utterances of a group
together, shards cut before the group that would overflow --shard-size (a group alone larger than a
shard is split at sample boundaries). Encoding is deterministic, so the whole output is a function of
the inputs and the parameters: an interrupted run can keep its finished shards and redo the rest.

Progress lives in `_progress.json` beside the shards (rewritten after every shard); the manifest is
written last and the progress file removed, so a manifest always means a complete set.

Across machines: part i of n encodes the i-th of n contiguous slices of the plan's groups into a shard
set of its own under `_parts/` (resumable like any set, finished when its manifest exists), and
`finalize_parts` packs the parts' samples, in plan order, into the shards and manifest a one-machine
run writes: the same greedy cuts over the same bytes, without encoding anything again.
"""
from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from itertools import groupby
from typing import Iterator

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from voxstream.shards import storage
from voxstream.shards.audio import Rejected, check, cut_points, to_16k
from voxstream.shards.corpora import BadInput, Listing, Reader, Recording
from voxstream.shards.format import MANIFEST, REJECTED, SAMPLE_RATE, Manifest, Sample, build_shard, encode_flac, \
    flac_intact, iter_samples, sample_key, read_manifest, shard_name, write_manifest
from voxstream.shards.storage import Retry

PROGRESS = "_progress.json"
PARTS = "_parts"


@dataclass
class WriteConfig:
    out: str
    prefix: str = ""                   # shard name prefix; the corpus name when empty
    shard_size: int = 256 * 2**20      # bytes
    seed: int = 0
    workers: int = 1
    min_duration: float = 0.5          # seconds; shorter inputs are rejected
    max_duration: float | None = None  # seconds; longer inputs are cut at quiet points
    resume: bool = False
    storage_options: dict = field(default_factory=dict)
    retry: Retry = Retry()             # how writing a shard or the progress file is retried


@dataclass
class EncodeSpec:
    """What a worker needs to turn one item into samples (pickled to the worker processes)."""
    corpus: str
    reader: Reader
    root: str | None
    min_duration: float
    max_duration: float | None


def plan(items: list[Recording], seed: int) -> list[list[Recording]]:
    """Recordings grouped by group (listing order inside a group), groups in a seeded global shuffle."""
    groups: dict[str, list[Recording]] = {}
    for item in items:
        groups.setdefault(item.group, []).append(item)
    ordered = [groups[g] for g in sorted(groups)]
    return [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]


def encode_item(item: Recording, spec: EncodeSpec) -> tuple[list[Sample], list[dict]]:
    """(samples, rejections) for one input: read, 16 kHz int16, validate, cut if long, FLAC."""
    source = os.path.relpath(item.source, spec.root) if spec.root else item.source
    try:
        wave, rate, generated = spec.reader(item)
        wave = to_16k(wave, rate)
        check(wave, spec.min_duration)
    except Rejected as e:
        return [], [{"source": source, "reason": str(e)}]
    except Exception as e:  # one bad file must not stop a run over millions
        return [], [{"source": source, "reason": f"failed to read: {type(e).__name__}: {e}"}]
    spans = cut_points(wave, int(spec.max_duration * SAMPLE_RATE)) if spec.max_duration else [(0, len(wave))]
    samples, rejected = [], []
    for i, (start, end) in enumerate(spans):
        utt = item.utt if len(spans) == 1 else f"{item.utt}_{i:04d}"
        segment = wave[start:end]
        try:
            check(segment, spec.min_duration)
        except Rejected as e:
            rejected.append({"source": source, "start": start / SAMPLE_RATE, "reason": str(e)})
            continue
        meta = {"utt": utt, "corpus": spec.corpus, "speaker": item.speaker, "session": item.session,
                "group": item.group, "duration": len(segment) / SAMPLE_RATE, "num_samples": len(segment),
                "sample_rate": SAMPLE_RATE, "source": source, **dict(item.extra), **generated}
        if len(spans) > 1:
            meta["start"] = start / SAMPLE_RATE
        samples.append(Sample(sample_key(spec.corpus, item.speaker, item.session, utt), meta, encode_flac(segment)))
    return samples, rejected


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # parallelism comes from the processes; threads would only contend


def _encoded(work: Iterator[tuple[int, Recording]], spec: EncodeSpec, workers: int
             ) -> Iterator[tuple[int, list[Sample], list[dict]]]:
    """(group index, samples, rejections) per item, in plan order, with a bounded window in flight."""
    if workers <= 1:
        for gi, item in work:
            yield gi, *encode_item(item, spec)
        return
    # spawn: torch and s3fs state must not be forked into the workers
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker) as pool:
        window: collections.deque = collections.deque()
        for gi, item in work:
            window.append((gi, pool.submit(encode_item, item, spec)))
            if len(window) >= 8 * workers:
                gi0, fut = window.popleft()
                yield gi0, *fut.result()
        while window:
            gi0, fut = window.popleft()
            yield gi0, *fut.result()


def tar_cost(meta: dict, flac_bytes: int) -> int:
    """Bytes a sample adds to a tar: a 512-byte header and padded payload per member. The position
    and crc32 build_shard writes are counted at their widest, as they are not known yet."""
    meta_len = len(json.dumps({**meta, "position": 10**9, "crc32": 2**32 - 1}, sort_keys=True).encode())
    return sum(512 + -(-n // 512) * 512 for n in (flac_bytes, meta_len))


class _Progress:
    """Finished shard records and rejections so far, saved after every shard so a run can resume."""

    def __init__(self, cfg: WriteConfig, fingerprint: str):
        self.cfg, self.fingerprint = cfg, fingerprint
        self.url = storage.join(cfg.out, PROGRESS)
        self.shards: list[dict] = []           # ShardStats fields + "ends_at" (next group, or None mid-group)
        self.rejected: list[tuple[int, dict]] = []

    def save(self, shards: list[dict], rejected: list[tuple[int, dict]]) -> None:
        state = {"fingerprint": self.fingerprint, "shards": shards, "rejected": rejected}
        self.cfg.retry.call(lambda: storage.write_json(self.url, state, self.cfg.storage_options), f"write {self.url}")

    def restore(self) -> int:
        """Keep the verified shards up to the last that ends at a group boundary; return that group."""
        state = storage.read_json(self.url, self.cfg.storage_options)
        if state["fingerprint"] != self.fingerprint:
            raise BadInput(f"{self.url}: inputs or parameters differ from the interrupted run; "
                           "rerun with the same ones, or write to a fresh --out")
        kept, start = [], 0
        for i, record in enumerate(state["shards"]):
            if not shard_intact(storage.join(self.cfg.out, record["name"]), record, self.cfg.storage_options):
                break
            if record["ends_at"] is not None:
                kept, start = state["shards"][:i + 1], record["ends_at"]
        self.shards = kept
        self.rejected = [(gi, r) for gi, r in state["rejected"] if gi < start]
        return start


def shard_intact(url: str, record: dict, storage_options: dict) -> bool:
    fs, path = storage.filesystem(url, storage_options)
    if not fs.exists(path) or fs.size(path) != record["bytes"]:
        return False
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest() == record["sha256"]


class _Packer:
    """Collects whole groups into shards and hands full shards to a single background writer."""

    def __init__(self, cfg: WriteConfig, progress: _Progress):
        self.cfg, self.progress = cfg, progress
        self.samples: list[Sample] = []
        self.bytes = 0
        self.writer = ThreadPoolExecutor(1)
        self.pending: Future | None = None

    def add_group(self, gi: int, samples: list[Sample]) -> None:
        costs = [tar_cost(s.meta, len(s.flac)) for s in samples]
        if self.samples and self.bytes + sum(costs) > self.cfg.shard_size:
            self.flush(ends_at=gi)
        for sample, cost in zip(samples, costs):
            if self.samples and self.bytes + cost > self.cfg.shard_size:  # only a group larger than a shard
                self.flush(ends_at=None)
            self.samples.append(sample)
            self.bytes += cost

    def flush(self, ends_at: int | None) -> None:
        if not self.samples:
            return
        name = shard_name(self.cfg.prefix, len(self.progress.shards))
        data, stats = build_shard(self.samples, name)
        self.progress.shards.append({**asdict(stats), "ends_at": ends_at})
        snapshot = (list(self.progress.shards), list(self.progress.rejected))
        self.samples, self.bytes = [], 0
        self.wait()  # one shard in flight bounds memory to about two shards
        self.pending = self.writer.submit(self._write, data, name, snapshot)

    def _write(self, data: bytes, name: str, snapshot) -> None:
        url = storage.join(self.cfg.out, name)
        self.cfg.retry.call(lambda: storage.write_bytes(url, data, self.cfg.storage_options), f"write {url}")
        self.progress.save(*snapshot)

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None


def fingerprint(listing: Listing, groups: list[list[Recording]], params: dict) -> str:
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for group in groups:
        for item in group:
            digest.update(repr(tuple(asdict(item).values())).encode())
    digest.update(json.dumps(listing.skipped).encode())
    return digest.hexdigest()


def check_destination(cfg: WriteConfig) -> None:
    fs, path = storage.filesystem(cfg.out, cfg.storage_options)
    taken = [n for n in (MANIFEST, PROGRESS) if fs.exists(f"{path}/{n}")] + fs.glob(f"{path}/{cfg.prefix}-*.tar")
    if taken:
        raise BadInput(f"--out {cfg.out} already holds {os.path.basename(taken[0])}: "
                       "pass --resume to continue that run, or choose a fresh --out")


def part_url(out: str, part: int, parts: int) -> str:
    """Where part `part` of `parts` writes its shard set."""
    return storage.join(out, PARTS, f"{part:05d}-of-{parts:05d}")


def _planned(listing: Listing, cfg: WriteConfig) -> tuple[WriteConfig, list[list[Recording]], dict]:
    """(cfg with its prefix, the plan's groups, the parameters the manifest records) of a listing."""
    cfg = replace(cfg, prefix=cfg.prefix or listing.corpus)
    groups = plan(listing.items, cfg.seed)
    params = {**listing.params, "seed": cfg.seed, "shard_size": cfg.shard_size, "min_duration": cfg.min_duration,
              "max_duration": cfg.max_duration, "inputs": len(listing.items), "groups": len(groups)}
    return cfg, groups, params


def _share(groups: list[list[Recording]], part: int, parts: int) -> list[list[Recording]]:
    return groups[part * len(groups) // parts:(part + 1) * len(groups) // parts]


def write_shards(listing: Listing, cfg: WriteConfig, part: tuple[int, int] | None = None
                 ) -> tuple[Manifest, list[dict]]:
    """Shard a listing to cfg.out; returns the manifest written and the rejections (listing's first).
    `part=(i, n)`: only the i-th of n slices of the plan, as a set of its own at part_url (finalize_parts)."""
    cfg, groups, params = _planned(listing, cfg)
    skipped = listing.skipped
    if part:
        cfg, groups, skipped = replace(cfg, out=part_url(cfg.out, *part)), _share(groups, *part), []
        params["part"] = list(part)
    progress = _Progress(cfg, fingerprint(listing, groups, params))
    params["plan"] = progress.fingerprint
    manifest = Manifest(corpus=listing.corpus, prefix=cfg.prefix, params=params)
    if cfg.resume:
        start = _resume(cfg, progress)
        if isinstance(start, Manifest):
            return start, read_rejections(cfg)
    else:
        check_destination(cfg)
        start = 0
    spec = EncodeSpec(listing.corpus, listing.reader, listing.params.get("root"), cfg.min_duration, cfg.max_duration)
    with logging_redirect_tqdm():  # retry warnings print above the progress bar, not through it
        _encode_and_pack(groups, start, spec, cfg, progress)
    rejected = skipped + [r for _, r in progress.rejected]
    return _finish(cfg, manifest, progress, rejected, empty=part is not None), rejected


def _finish(cfg: WriteConfig, manifest: Manifest, progress: _Progress, rejected: list[dict], empty: bool = False
            ) -> Manifest:
    """Write rejected.jsonl, then the manifest of the shards in `progress`; remove the progress file.
    A set without shards is an error unless `empty` (a part may reject all of its few inputs)."""
    lines = "".join(json.dumps(r) + "\n" for r in rejected).encode()
    storage.write_bytes(storage.join(cfg.out, REJECTED), lines, cfg.storage_options)
    if not progress.shards and not empty:
        raise BadInput(f"no usable audio: all {len(rejected)} inputs rejected, see {storage.join(cfg.out, REJECTED)}")
    manifest.params["rejected"] = len(rejected)
    manifest.shards = [{k: v for k, v in s.items() if k != "ends_at"} for s in progress.shards]
    write_manifest(cfg.out, manifest, cfg.storage_options)
    if storage.exists(progress.url, cfg.storage_options):  # a part without shards never wrote one
        fs, path = storage.filesystem(progress.url, cfg.storage_options)
        fs.rm(path)
    return manifest


def finalize_parts(listing: Listing, cfg: WriteConfig, parts: int) -> tuple[Manifest, list[dict]]:
    """Pack the `parts` finished parts of a listing's plan into cfg.out, as write_shards would have in one
    run, then remove them. A part missing or made from other inputs or parameters is a BadInput naming it."""
    cfg, groups, params = _planned(listing, cfg)
    urls = [part_url(cfg.out, i, parts) for i in range(parts)]
    for i, url in enumerate(urls):
        if not storage.exists(storage.join(url, MANIFEST), cfg.storage_options):
            raise BadInput(f"--finalize {parts}: part {i}/{parts} is not finished (no manifest in {url}); "
                           f"run it, with --resume if it was interrupted")
        made = fingerprint(listing, _share(groups, i, parts), {**params, "part": [i, parts]})
        if read_manifest(url, cfg.storage_options).params.get("plan") != made:
            raise BadInput(f"--finalize {parts}: {url} was made from other inputs or parameters")
    progress = _Progress(cfg, fingerprint(listing, groups, params))
    params["plan"] = progress.fingerprint
    done = finished_or_tidied(cfg, progress.fingerprint)
    if done is not None:
        return done, read_rejections(cfg)
    packer, rejected, gi = _Packer(cfg, progress), list(listing.skipped), 0
    try:
        for url in urls:
            rejected += read_rejections(replace(cfg, out=url))
            for _, group in groupby(_part_samples(url, cfg.storage_options), key=lambda s: s.meta["group"]):
                packer.add_group(gi, list(group))
                gi += 1
        packer.flush(ends_at=gi)
        packer.wait()
    finally:
        packer.writer.shutdown(wait=True)
    manifest = _finish(cfg, Manifest(corpus=listing.corpus, prefix=cfg.prefix, params=params), progress, rejected)
    fs, path = storage.filesystem(storage.join(cfg.out, PARTS), cfg.storage_options)
    fs.invalidate_cache(path)  # object-store listings are cached per filesystem instance
    fs.rm(path, recursive=True)
    return manifest, rejected


def _part_samples(url: str, storage_options: dict) -> Iterator[Sample]:
    """A part's samples in order, their metadata as encoded (build_shard adds position and crc32 again)."""
    for shard in read_manifest(url, storage_options).shards:
        for key, meta, flac in iter_samples(storage.join(url, shard["name"]), storage_options):
            if not flac_intact(meta, flac):
                raise BadInput(f"{url}/{shard['name']}: {key}: FLAC bytes fail their crc32; rerun that part")
            yield Sample(key, {k: v for k, v in meta.items() if k not in ("position", "crc32")}, flac)


def _resume(cfg: WriteConfig, progress: _Progress) -> Manifest | int:
    """A finished set (nothing to do) or the group to continue from (0 when nothing was done)."""
    done = finished_or_tidied(cfg, progress.fingerprint)
    if done is not None:
        return done
    if storage.exists(progress.url, cfg.storage_options):
        return progress.restore()
    return 0


def finished_or_tidied(cfg: WriteConfig, plan: str) -> Manifest | None:
    """On --resume: the finished set of this plan, or None after removing the interrupted run's partial writes."""
    if storage.exists(storage.join(cfg.out, MANIFEST), cfg.storage_options):
        done = read_manifest(cfg.out, cfg.storage_options)
        if done.params.get("plan") != plan:
            raise BadInput(f"--out {cfg.out} holds a finished set made from other inputs or parameters")
        return done
    fs, path = storage.filesystem(cfg.out, cfg.storage_options)
    for leftover in fs.glob(f"{path}/*.tmp-*"):  # a local write cut short by the interruption
        fs.rm(leftover)
    return None


def read_rejections(cfg: WriteConfig) -> list[dict]:
    text = storage.read_bytes(storage.join(cfg.out, REJECTED), cfg.storage_options).decode()
    return [json.loads(line) for line in text.splitlines()]


def _encode_and_pack(groups: list[list[Recording]], start: int, spec: EncodeSpec, cfg: WriteConfig,
                     progress: _Progress) -> None:
    packer = _Packer(cfg, progress)
    work = ((gi, item) for gi in range(start, len(groups)) for item in groups[gi])
    done_seconds = sum(s["seconds"] for s in progress.shards)
    bar = tqdm(total=sum(map(len, groups)), initial=sum(map(len, groups[:start])), unit="file",
               desc=f"{spec.corpus} -> {cfg.out}", dynamic_ncols=True, disable=None)
    current, collected = start, []
    try:
        for gi, samples, rejected in _encoded(work, spec, cfg.workers):
            if gi != current:
                packer.add_group(current, collected)
                current, collected = gi, []
            collected += samples
            progress.rejected += [(gi, r) for r in rejected]
            done_seconds += sum(m["duration"] for _, m, _ in samples)
            bar.update()
            bar.set_postfix_str(f"{done_seconds / 3600:.2f} h audio, {len(progress.rejected)} rejected", refresh=False)
        packer.add_group(current, collected)
        packer.flush(ends_at=len(groups))
        packer.wait()
    finally:
        bar.close()
        packer.writer.shutdown(wait=True)
