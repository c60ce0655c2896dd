"""What SSPS needs from the pipeline, on real tar shards of ramps (tests/ramps.py): every item's stable
global index from the manifest (shard, position), its speaker, and a clean reference crop of its own
utterance."""
from __future__ import annotations

import hashlib
import io
import signal
import tarfile

import numpy as np
import pytest

from ramps import config, make_set, ramp
from voxstream.pipeline.cpu_augment import prepare_cpu_augment
from voxstream.pipeline.loader import make_loader
from voxstream.pipeline.sources import index_size, resolve_all
from voxstream.shards import format as fmt
from voxstream.shards.verify import verify

SIZES_A, SIZES_B = [7, 9, 5], [6, 8]


@pytest.fixture(autouse=True)
def deadline():
    """A hung loader fails the test instead of the session."""
    signal.alarm(120)
    yield
    signal.alarm(0)


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """Two corpora of ramps; {key: (slope, phase, num_samples)} of each, in manifest order."""
    a, b = str(tmp_path_factory.mktemp("a")), str(tmp_path_factory.mktemp("b"))
    return (a, make_set(a, SIZES_A, corpus="a", seed=1)), (b, make_set(b, SIZES_B, corpus="b", seed=2))


def is_crop_of(crop: np.ndarray, whole: np.ndarray) -> bool:
    """Whether `crop` is a contiguous run of `whole`, repeated cyclically when longer than it."""
    return any(np.array_equal(np.take(whole, np.arange(len(crop)) + start, mode="wrap"), crop)
               for start in np.flatnonzero(whole == crop[0]))


def test_build_shard_writes_each_samples_position_and_leaves_the_callers_metadata(tmp_path):
    url = str(tmp_path)
    make_set(url, [4, 3])
    for shard, size in zip(fmt.shard_urls(url), [4, 3]):
        assert [s.meta["position"] for s in fmt.iter_samples(shard)] == list(range(size))
    assert "position" in fmt.META_FIELDS and verify(url).ok
    sample = next(fmt.iter_samples(fmt.shard_urls(url)[1]))
    meta = {k: v for k, v in sample.meta.items() if k != "position"}
    first, _ = fmt.build_shard([fmt.Sample(sample.key, meta, sample.flac)] * 2, "x-000000.tar")
    assert "position" not in meta
    assert fmt.build_shard([fmt.Sample(sample.key, meta, sample.flac)] * 2, "x-000000.tar")[0] == first


def test_verify_reports_a_stale_position(tmp_path):
    url = str(tmp_path)
    make_set(url, [3])
    path = tmp_path / fmt.shard_name("syn", 0)
    with path.open("rb") as f:
        samples = list(fmt.iter_tar(f))
    buf = io.BytesIO()  # the samples in reverse order, their metadata untouched: positions now wrong
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples[::-1]:
            for ext in ("flac", "json"):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(members[ext])
                tar.addfile(info, io.BytesIO(members[ext]))
    path.write_bytes(buf.getvalue())
    record = fmt.read_manifest(url).shards[0]
    record.update(bytes=len(buf.getvalue()), sha256=hashlib.sha256(buf.getvalue()).hexdigest())
    fmt.write_manifest(url, fmt.Manifest(corpus="syn", prefix="syn", shards=[record]))
    assert verify(url).problems == [f"{record['name']}: {samples[2][0]}: position 2, but sample 0 of its shard",
                                    f"{record['name']}: {samples[0][0]}: position 0, but sample 2 of its shard"]

