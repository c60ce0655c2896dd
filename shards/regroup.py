"""Regroup a shard set by pseudo-speaker, copying the FLAC bytes: `make_shards.py regroup`.

A labels file (shards/labels.py) names each utterance's pseudo-speaker. The regrouped set holds the
same utterances, byte for byte, each pseudo-speaker's together, so that `data.mode=cross-utterance`
draws two utterances of one pseudo-speaker as a positive pair. In the metadata `group` becomes
`label-<n>` (the name `data.labels` gives it) and the original group moves to `source_group`; keys and
the other fields stay. An utterance the labels file has no label for keeps its group (the manifest's
params count them as `unlabeled`).

The plan, as for the other subcommands: pseudo-speakers in a seeded order, each one's utterances in
input order, shards cut by --shard-size before the pseudo-speaker that would overflow (one larger than
a shard is split between neighbouring shards). Output shards are independent of one another: the
--workers build them in parallel, and --resume keeps those whose checksum matches their record in
`_progress.json`. The plan is saved in `_plan.npz` so that a resumed run does not index the input again.

Cost: one indexing read of the input (the tar headers and the small .json members; through fsspec's
read-ahead cache, one sequential read of each input shard) and one copy of the bytes (each output
shard fetches its samples' byte ranges from the input shards, grouped in one ranged read per
output shard, and writes them); no audio is decoded or encoded. Memory: the index, 32 bytes an
utterance (35 MB for VoxCeleb2's 1.1 M), and about two output shards per worker. Measured on local
disk (2 busy shared cores): 720 utterances of 3 s (57 MB) in 0.65 s with one worker, 89 MB/s;
with --workers 2, 7.5 s, nearly all of it the spawned workers importing torch, a fixed cost that
only pays off on sets far larger than one or two shards.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import multiprocessing
import tarfile
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import replace
from itertools import groupby

import numpy as np
from tqdm import tqdm

from voxstream.shards import storage
from voxstream.shards.corpora import BadInput
from voxstream.shards.format import Manifest, Sample, build_shard, flac_intact, iter_tar, read_manifest, shard_name, \
    split_member, write_manifest
from voxstream.shards.labels import Labels, read_labels
from voxstream.shards.writer import PROGRESS, WriteConfig, check_destination, finished_or_tidied, shard_intact, \
    tar_cost

PLAN = "_plan.npz"
# One row per utterance: where its members lie in which input shard, its label (-1: none) and the
# bytes it will take in an output shard.
ROW = np.dtype([("shard", "i4"), ("offset", "i8"), ("size", "i8"), ("label", "i4"), ("cost", "i8")])


def relabel(meta: dict, label: int) -> dict:
    """An utterance's metadata in the regrouped set: its pseudo-speaker as the group, the original kept."""
    return meta if label < 0 else {**meta, "group": f"label-{label}", "source_group": meta["group"]}


@functools.lru_cache(maxsize=1)
def _labels(url: str, options: str) -> Labels:
    """Read once per process (options as JSON, to be hashable)."""
    return read_labels(url, json.loads(options))


def index_shard(shard: int, url: str, labels_url: str, storage_options: dict) -> tuple[np.ndarray, list[str]]:
    """The rows of one input shard's utterances and their groups in the regrouped set, from the tar
    headers and .json members only."""
    labels = _labels(labels_url, json.dumps(storage_options, sort_keys=True))
    rows, groups = [], []
    fs, path = storage.filesystem(url, storage_options)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for key, members in groupby(tar, key=lambda m: split_member(m.name)[0]):
            members = list(members)
            by_ext = {split_member(m.name)[1]: m for m in members}
            if sorted(by_ext) != ["flac", "json"]:
                raise BadInput(f"{url}: {key} has members {sorted(by_ext)}, expected flac and json")
            label = labels.lookup(key)
            meta = relabel(json.loads(tar.extractfile(by_ext["json"]).read()), label)
            end = members[-1].offset_data + -(-members[-1].size // 512) * 512
            rows.append((shard, members[0].offset, end - members[0].offset, label, tar_cost(meta, by_ext["flac"].size)))
            groups.append(meta["group"])
    return np.array(rows, dtype=ROW), groups


def cut(groups: np.ndarray, costs: np.ndarray, shard_size: int) -> list[int]:
    """The first row of each output shard, rows in plan order: a shard ends before the group that
    would overflow it, and only a group larger than a shard is split (at utterance boundaries)."""
    starts, size = [0], 0
    bounds = (np.flatnonzero(np.diff(groups)) + 1).tolist()
    for lo, hi in zip([0, *bounds], [*bounds, len(groups)]):
        if size and size + int(costs[lo:hi].sum()) > shard_size:
            starts.append(lo)
            size = 0
        for i in range(lo, hi):
            if size and size + int(costs[i]) > shard_size:
                starts.append(i)
                size = 0
            size += int(costs[i])
    return starts


def make_plan(urls: list[str], labels_url: str, cfg: WriteConfig, pool: Executor) -> tuple[np.ndarray, list[int]]:
    """(rows in plan order, first row of each output shard) after indexing every input shard."""
    ids: dict[str, int] = {}
    parts, group_ids = [], []
    jobs = [pool.submit(index_shard, i, url, labels_url, cfg.storage_options) for i, url in enumerate(urls)]
    for job in tqdm(jobs, desc=f"index {len(urls)} shards", unit="shard", dynamic_ncols=True, disable=None):
        rows, groups = job.result()
        parts.append(rows)
        group_ids.append(np.array([ids.setdefault(g, len(ids)) for g in groups], dtype=np.int64))
    rows, group = np.concatenate(parts), np.concatenate(group_ids)
    names = sorted(ids)
    position = np.empty(len(names), dtype=np.int64)  # of each group id in the seeded order
    position[[ids[names[j]] for j in np.random.default_rng(cfg.seed).permutation(len(names))]] = np.arange(len(names))
    order = np.argsort(position[group], kind="stable")  # stable: input order within a group
    return rows[order], cut(position[group][order], rows["cost"][order], cfg.shard_size)


def build_output(name: str, paths: list[str], rows: np.ndarray, cfg: WriteConfig) -> dict:
    """Write one output shard: its utterances' byte ranges read from the input shards, relabelled."""
    fs, _ = storage.filesystem(paths[0], cfg.storage_options)
    starts = rows["offset"].tolist()
    ends = (rows["offset"] + rows["size"]).tolist()
    inside = [storage.filesystem(p, cfg.storage_options)[1] for p in paths]
    chunks = cfg.retry.call(lambda: fs.cat_ranges(inside, starts, ends, on_error="raise"), f"read the samples of {name}")
    # Each range is whole tar members, so the ranges one after another read as one tar stream.
    samples = [Sample(key, relabel(json.loads(members["json"]), int(label)), members["flac"])
               for (key, members), label in zip(iter_tar(io.BytesIO(b"".join(chunks))), rows["label"], strict=True)]
    # build_shard records a fresh crc32: check the old one first, or a corrupted input would pass as sound.
    if broken := [s.key for s in samples if not flac_intact(s.meta, s.flac)]:
        raise BadInput(f"{name}: {len(broken)} input sample(s) fail their crc32, first {broken[0]}: "
                         f"run verify on the input set")
    data, stats = build_shard(samples, name)
    url = storage.join(cfg.out, name)
    cfg.retry.call(lambda: storage.write_bytes(url, data, cfg.storage_options), f"write {url}")
    return vars(stats)


def regroup(source: str, labels_url: str, cfg: WriteConfig) -> Manifest:
    """Write the set at `source` regrouped by the labels to cfg.out; returns the manifest written."""
    try:
        inputs = read_manifest(source, cfg.storage_options)
        labels = _labels(labels_url, json.dumps(cfg.storage_options, sort_keys=True))
    except (FileNotFoundError, ValueError) as e:
        raise BadInput(str(e)) from None
    made_from = labels.info.get("set")  # None: made by hand, trusted
    if made_from is not None and sorted((s["name"], s.get("sha256")) for s in made_from) != \
            sorted((s["name"], s["sha256"]) for s in inputs.shards):
        raise BadInput(f"--labels {labels_url}: made for another shard set ({len(made_from)} shards, first "
                       f"{made_from[0]['name'] if made_from else 'none'}), not for --in {source}")
    cfg = replace(cfg, prefix=cfg.prefix or inputs.corpus)
    params = {"regrouped_from": source, "labels": labels_url, "seed": cfg.seed, "shard_size": cfg.shard_size}
    digest = hashlib.sha256(json.dumps([params, cfg.prefix, [s["sha256"] for s in inputs.shards]]).encode())
    digest.update(labels.hashes.tobytes() + labels.labels.tobytes())
    fingerprint = digest.hexdigest()
    if cfg.resume:
        if (done := finished_or_tidied(cfg, fingerprint)) is not None:
            return done
    else:
        check_destination(cfg)
    urls = [storage.join(source, s["name"]) for s in inputs.shards]
    # spawn: torch (imported by webdataset) and s3fs state must not be forked into the workers
    with (ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn")) if cfg.workers > 1
          else ThreadPoolExecutor(1)) as pool:
        rows, starts = _plan(urls, labels_url, cfg, fingerprint, pool)
        shards = _build(urls, rows, starts, cfg, fingerprint, pool)
    labelled = rows["label"][rows["label"] >= 0]
    manifest = Manifest(corpus=inputs.corpus, prefix=cfg.prefix, shards=shards, params={
        **params, "samples": len(rows), "pseudo_speakers": len(np.unique(labelled)),
        "unlabeled": len(rows) - len(labelled), "plan": fingerprint})
    write_manifest(cfg.out, manifest, cfg.storage_options)
    fs, path = storage.filesystem(cfg.out, cfg.storage_options)
    fs.rm([f"{path}/{PROGRESS}", f"{path}/{PLAN}"])
    return manifest


def _plan(urls: list[str], labels_url: str, cfg: WriteConfig, fingerprint: str,
          pool: Executor) -> tuple[np.ndarray, list[int]]:
    """The saved plan of an interrupted run of these inputs and parameters, or a new one, saved."""
    url = storage.join(cfg.out, PLAN)
    if cfg.resume and storage.exists(url, cfg.storage_options):
        with np.load(io.BytesIO(storage.read_bytes(url, cfg.storage_options))) as saved:
            _same_run(url, str(saved["fingerprint"]), fingerprint)
            return saved["rows"], saved["starts"].tolist()
    rows, starts = make_plan(urls, labels_url, cfg, pool)
    if not len(rows):
        raise BadInput(f"--in {urls[0].rsplit('/', 1)[0] if urls else 'set'}: no utterances to regroup")
    buf = io.BytesIO()
    np.savez(buf, rows=rows, starts=np.array(starts), fingerprint=np.array(fingerprint))
    cfg.retry.call(lambda: storage.write_bytes(url, buf.getvalue(), cfg.storage_options), f"write {url}")
    return rows, starts


def _build(urls: list[str], rows: np.ndarray, starts: list[int], cfg: WriteConfig, fingerprint: str,
           pool: Executor) -> list[dict]:
    """Every output shard's record, building those not already intact from an interrupted run."""
    progress = storage.join(cfg.out, PROGRESS)
    done: dict[str, dict] = {}
    if cfg.resume and storage.exists(progress, cfg.storage_options):
        state = storage.read_json(progress, cfg.storage_options)
        _same_run(progress, state["fingerprint"], fingerprint)
        done = {n: r for n, r in state["shards"].items() if shard_intact(storage.join(cfg.out, n), r, cfg.storage_options)}
    names = [shard_name(cfg.prefix, i) for i in range(len(starts))]
    bounds = [*starts, len(rows)]
    jobs = [pool.submit(build_output, name, [urls[s] for s in rows["shard"][lo:hi]], rows[lo:hi], cfg)
            for name, lo, hi in zip(names, bounds, bounds[1:]) if name not in done]
    bar = tqdm(total=len(names), initial=len(names) - len(jobs), unit="shard", desc=f"regroup -> {cfg.out}",
               dynamic_ncols=True, disable=None)
    with bar:
        for job in as_completed(jobs):
            record = job.result()
            done[record["name"]] = record
            state = {"fingerprint": fingerprint, "shards": done}
            cfg.retry.call(lambda: storage.write_json(progress, state, cfg.storage_options), f"write {progress}")
            bar.update()
    return [done[n] for n in names]


def _same_run(url: str, saved: str, fingerprint: str) -> None:
    if saved != fingerprint:
        raise BadInput(f"{url}: inputs or parameters differ from the interrupted run; "
                       "rerun with the same ones, or write to a fresh --out")
