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


def test_shards_know_their_first_index_and_mixed_corpora_get_disjoint_ranges(two_sets):
    (a, _), (b, _) = two_sets
    corpora, _ = resolve_all([a, b], None)
    assert [s.first for c in corpora for s in c.shards] == [0, 7, 16, 21, 27]
    assert index_size(corpora) == sum(SIZES_A + SIZES_B)


@pytest.mark.parametrize("mode, workers", [("same-utterance", 0), ("cross-utterance", 2)])
def test_every_item_has_its_stable_global_index_and_speaker(two_sets, mode, workers):
    (a, truth_a), (b, truth_b) = two_sets
    expected = {key: i for i, key in enumerate([*truth_a, *truth_b])}  # manifest offset + position
    cfg = config([a, b], mode=mode, workers=workers, steps_per_epoch=8)
    seen: dict[str, int] = {}
    for epoch, rank in [(0, 0), (0, 1), (1, 0)]:
        for batch in make_loader(cfg, epoch, rank, 2):
            assert len(batch.indices) == len(batch.speakers) == len(batch.keys)
            for key, index, speaker in zip(batch.keys, batch.indices, batch.speakers):
                assert index == expected[key] and speaker == key.split("/")[1]
                seen[key] = index
    assert {key.split("/")[0] for key in seen} == {"a", "b"} and len(seen) > len(expected) // 2
    assert len(set(seen.values())) == len(seen) and set(seen.values()) <= set(range(len(expected)))


def test_a_spec_without_manifest_gives_no_index(two_sets):
    (a, _), (b, _) = two_sets
    pattern = f"{a}/a-{{000000..000002}}.tar"
    corpora, _ = resolve_all([pattern, b], None)
    assert index_size(corpora) is None and all(s.first is None for s in corpora[0].shards)
    assert [s.first for s in corpora[1].shards] == [0, 6]  # a corpus without manifest takes no range
    batch = next(iter(make_loader(config(pattern), 0, 0, 1)))
    assert batch.indices == [-1] * 4 and batch.speakers == [key.split("/")[1] for key in batch.keys]


@pytest.mark.parametrize("mode, workers", [("same-utterance", 2), ("cross-utterance", 0)])
def test_reference_view_is_a_crop_of_the_items_own_utterance(two_sets, mode, workers):
    (a, truth), _ = two_sets
    cfg = config(a, mode=mode, workers=workers)
    assert len(next(iter(make_loader(cfg, 0, 0, 1))).views) == 2  # only when asked for
    for batch in make_loader(cfg, 0, 0, 1, reference_seconds=1.75):  # longer than some utterances: padded
        assert [tuple(v.shape) for v in batch.views] == [(4, 8000), (4, 8000), (4, 28000)]
        for key, reference in zip(batch.keys, batch.views[-1].numpy()):
            assert is_crop_of(reference, ramp(*truth[key]))


def test_cpu_augmentation_leaves_the_reference_view_clean(two_sets, tmp_path):
    (a, truth), _ = two_sets
    gain = prepare_cpu_augment([{"name": "Gain", "min_gain_db": -12.0, "max_gain_db": -3.0, "p": 1.0}], str(tmp_path))
    for batch in make_loader(config(a), 0, 0, 1, cpu_augment=gain, reference_seconds=0.5):
        for key, view, reference in zip(batch.keys, batch.views[0].numpy(), batch.views[-1].numpy()):
            whole = ramp(*truth[key])
            assert not is_crop_of(view, whole) and is_crop_of(reference, whole)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_same_reference_views_indices_and_speakers(two_sets, workers):
    (a, _), (b, _) = two_sets
    cfg = config([a, b], mode="cross-utterance", workers=workers, steps_per_epoch=9)
    full = list(make_loader(cfg, 1, 0, 1, reference_seconds=0.75))
    resumed = list(make_loader(cfg, 1, 0, 1, start_step=5, reference_seconds=0.75))
    for x, y in zip(full[5:], resumed, strict=True):
        assert (x.keys, x.indices, x.speakers) == (y.keys, y.indices, y.speakers) and len(x.views) == 3
        assert all(np.array_equal(u.numpy(), v.numpy()) for u, v in zip(x.views, y.views, strict=True))
