"""make_shards.py regroup on real shard sets: every utterance once and byte-identical, pseudo-speakers
contiguous, resume after a kill, a labels file for another set refused, cross-utterance pairs."""
from __future__ import annotations

import os
import subprocess
import sys
from itertools import groupby
from pathlib import Path

import numpy as np

from ramps import config, make_set, ramp
from test_pipeline import crop_slope, is_crop_of
from voxstream.pipeline.loader import make_loader
from voxstream.shards import format as fmt
from voxstream.shards.labels import write_labels
from voxstream.shards.verify import verify

TOOL = str(Path(__file__).parents[1] / "tools" / "make_shards.py")


def labels_for(url: str, labels: dict[str, int], out: str) -> None:
    made_from = [{"name": s["name"], "sha256": s["sha256"]} for s in fmt.read_manifest(url).shards]
    write_labels(out, list(labels), np.array(list(labels.values())), {"set": made_from})


def make_shards(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TOOL, *map(str, argv)], capture_output=True, text=True, **kw)


def samples(url: str) -> list[fmt.Sample]:
    return [s for shard in fmt.shard_urls(url) for s in fmt.iter_samples(shard)]


def files_of(url: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(url.iterdir())}


def test_every_utterance_once_byte_identical_with_pseudo_speakers_contiguous(tmp_path):
    src = str(tmp_path / "in")
    make_set(src, [30, 30, 30], group_size=5)
    before = {s.key: s for s in samples(src)}
    keys = sorted(before)
    labels = {k: i % 7 for i, k in enumerate(keys) if i % 10}  # every 10th utterance has no label
    labels_for(src, labels, str(tmp_path / "labels.npz"))
    args = ["regroup", "--in", src, "--labels", tmp_path / "labels.npz", "--shard-size", "60k", "--seed", "1"]
    done = make_shards(*args, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "90 samples of 7 pseudo-speakers" in done.stdout and "9 unlabeled" in done.stdout

    after = samples(str(tmp_path / "out"))
    assert sorted(s.key for s in after) == keys  # every utterance exactly once
    for key, meta, flac in after:
        assert flac == before[key].flac  # copied, not re-encoded
        original = before[key].meta["group"]
        if key in labels:
            assert (meta["group"], meta["source_group"]) == (f"label-{labels[key]}", original)
        else:  # unchanged but for its position, now in the new shard (verify checks it below)
            assert {**meta, "position": 0} == {**before[key].meta, "position": 0}
    groups = [g for g, _ in groupby(s.meta["group"] for s in after)]
    assert len(groups) == len(set(groups)) == 7 + len({before[k].meta["group"] for k in keys if k not in labels})
    manifest = fmt.read_manifest(str(tmp_path / "out"))
    assert len(manifest.shards) >= 3 and manifest.params["unlabeled"] == 9
    report = verify(str(tmp_path / "out"))
    assert report.ok, report.problems

    parallel = make_shards(*args, "--out", tmp_path / "parallel", "--workers", "2")
    assert parallel.returncode == 0, parallel.stderr
    assert files_of(tmp_path / "parallel") == files_of(tmp_path / "out")


# The tool as a process that kills itself (SIGKILL, no cleanup) as it writes its third output shard,
# once the progress file records the first two (the main thread records them as the shards complete,
# so on a busy machine the third can be written before the second is recorded).
KILLED_AT_THIRD_SHARD = f"""
import json, os, runpy, signal, sys, time
from voxstream.shards import storage
real, shards = storage.write_bytes, []
def write(url, data, storage_options=None):
    if url.endswith(".tar"):
        shards.append(url)
        if len(shards) == 3:
            progress = os.path.join(os.path.dirname(url), "_progress.json")
            for _ in range(200):
                if os.path.exists(progress) and len(json.load(open(progress))["shards"]) == 2:
                    break
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
    real(url, data, storage_options)
storage.write_bytes = write
sys.argv = [{TOOL!r}, *sys.argv[1:]]
runpy.run_path({TOOL!r}, run_name="__main__")
"""


def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    src = str(tmp_path / "in")
    keys = sorted(make_set(src, [20, 20], group_size=4))
    labels_for(src, {k: i % 5 for i, k in enumerate(keys)}, str(tmp_path / "labels.npz"))
    args = ["regroup", "--in", src, "--labels", tmp_path / "labels.npz", "--shard-size", "30k"]
    assert make_shards(*args, "--out", tmp_path / "clean").returncode == 0
    clean = files_of(tmp_path / "clean")
    assert len([n for n in clean if n.endswith(".tar")]) >= 5

    killed = subprocess.run([sys.executable, "-c", KILLED_AT_THIRD_SHARD, *map(str, args), "--out", tmp_path / "resumed"],
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    partial = files_of(tmp_path / "resumed")
    assert "manifest.json" not in partial and {"_plan.npz", "_progress.json"} <= set(partial)
    kept = {n: (tmp_path / "resumed" / n).stat().st_mtime_ns for n in partial if n.endswith(".tar")}
    assert len(kept) == 2
    refused = make_shards(*args, "--out", tmp_path / "resumed")
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = make_shards(*args, "--out", tmp_path / "resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert files_of(tmp_path / "resumed") == clean
    assert all((tmp_path / "resumed" / n).stat().st_mtime_ns == t for n, t in kept.items())  # kept, not rewritten


def test_a_labels_file_for_another_set_or_a_missing_set_is_one_line_naming_it(tmp_path):
    src, other = str(tmp_path / "in"), str(tmp_path / "other")
    keys = list(make_set(src, [8]))
    make_set(other, [8], seed=1)
    labels_for(other, {k: 0 for k in keys}, str(tmp_path / "other.npz"))
    done = make_shards("regroup", "--in", src, "--labels", tmp_path / "other.npz", "--out", tmp_path / "out")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "other.npz: made for another shard set" in done.stderr
    assert not (tmp_path / "out").exists()
    missing = make_shards("regroup", "--in", tmp_path / "nowhere", "--labels", tmp_path / "other.npz", "--out", tmp_path / "out")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "nowhere/manifest.json: no manifest" in missing.stderr


def test_cross_utterance_pairs_two_utterances_of_one_pseudo_speaker(tmp_path):
    src = str(tmp_path / "in")
    truth = make_set(src, [24, 24], group_size=3)
    # Pseudo-speaker j: the j-th utterance of slope 1, the (j+1)-th of slope 2, the (j+2)-th of slope 3,
    # so its three utterances come from three different source groups and differ in slope.
    by_slope = {s: sorted(k for k in truth if truth[k][0] == s) for s in (1, 2, 3)}
    n = len(by_slope[1])
    labels = {k: (j - s) % n for s, ks in by_slope.items() for j, k in enumerate(ks)}
    member = {(labels[k], truth[k][0]): k for k in truth}  # (pseudo-speaker, slope) -> utterance
    labels_for(src, labels, str(tmp_path / "labels.npz"))
    out = tmp_path / "out"
    assert make_shards("regroup", "--in", src, "--labels", tmp_path / "labels.npz", "--out", out).returncode == 0

    loader = make_loader(config(str(out), mode="cross-utterance", views=[0.5, 0.5], steps_per_epoch=8), 0, 0, 1)
    checked = 0
    for batch in loader:
        for row, (key, group) in enumerate(zip(batch.keys, batch.groups)):
            assert group == f"label-{labels[key]}"
            first, second = (v[row].numpy() for v in batch.views)
            assert crop_slope(first) == truth[key][0]
            other = member[labels[key], crop_slope(second)]
            assert other != key and other.split("/")[2] != key.split("/")[2]  # another utterance, another source group
            assert is_crop_of(second, ramp(*truth[other]))
            checked += 1
    assert checked == 8 * 4 and loader.stats["fallbacks"] == 0


def test_an_input_flac_that_fails_its_crc32_stops_regroup_with_one_line(tmp_path):
    """Regroup rewrites each sample through build_shard, which records a fresh crc32: without checking
    the old one, a corrupted input would come out looking sound."""
    src = str(tmp_path / "in")
    keys = list(make_set(src, [8]))
    labels_for(src, {k: 0 for k in keys}, str(tmp_path / "labels.npz"))
    shard = Path(fmt.shard_urls(src)[0])
    data = bytearray(shard.read_bytes())
    data[data.index(b"fLaC") + 200] ^= 0xFF  # one flipped byte in the first utterance's FLAC
    shard.write_bytes(bytes(data))
    done = make_shards("regroup", "--in", src, "--labels", tmp_path / "labels.npz", "--out", tmp_path / "out")
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1 and "1 input sample(s) fail their crc32" in done.stderr, done.stderr
