"""The streaming pipeline on real tar shards: splitting, epochs, views, corruption, resume, S3.

Every utterance is a ramp (tests/ramps.py), so a crop tells which utterance it came from and where.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch

from voxstream.pipeline.loader import Batch, group_ids, make_loader, views_to_device
from voxstream.pipeline.stats import StreamStats
from voxstream.pipeline.sources import Shard
from voxstream.pipeline.stream import CorruptShard, visit
from ramps import SR, config, make_set, ramp
from voxstream.shards import storage
from voxstream.shards.format import decode_audio, encode_flac, shard_name
from voxstream.shards.storage import Retry
from voxstream.shards.verify import verify


def crop_slope(crop: np.ndarray) -> int:
    """The slope of the ramp a crop was cut from: which utterance of its group."""
    return int((int(crop[1]) - int(crop[0])) % 65536)


def is_crop_of(crop: np.ndarray, whole: np.ndarray) -> bool:
    """Whether `crop` is a contiguous run of `whole`, repeated cyclically when longer than it."""
    return any(np.array_equal(np.take(whole, np.arange(len(crop)) + start, mode="wrap"), crop)
               for start in np.flatnonzero(whole == crop[0]))


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("shards"))
    return url, make_set(url, [24, 24, 24])


@pytest.fixture(autouse=True)
def deadline():
    """A hung loader fails the test instead of the session."""
    signal.alarm(120)
    yield
    signal.alarm(0)


def keys_by_stream(loader, workers: int) -> dict[int, list[tuple[str, ...]]]:
    streams: dict[int, list[tuple[str, ...]]] = {}
    for i, batch in enumerate(loader):
        streams.setdefault(i % workers, []).append(tuple(batch.keys))
    return streams


def test_ranks_and_workers_read_different_orders_that_change_each_epoch(shard_set):
    url, _ = shard_set
    cfg = config(url, workers=2, steps_per_epoch=8)
    orders = {}
    for epoch in (0, 1):
        for rank in (0, 1):
            for stream, keys in keys_by_stream(make_loader(cfg, epoch, rank, 2), 2).items():
                orders[epoch, rank, stream] = keys
    epoch0 = [orders[0, r, s] for r in (0, 1) for s in (0, 1)]
    assert len(set(map(tuple, epoch0))) == 4
    for r in (0, 1):
        for s in (0, 1):
            assert orders[0, r, s] != orders[1, r, s]
    # the same arguments give the same stream
    again = keys_by_stream(make_loader(cfg, 1, 1, 2), 2)
    assert again[0] == orders[1, 1, 0] and again[1] == orders[1, 1, 1]


def test_steps_per_epoch_equal_on_every_rank_whatever_the_shards(tmp_path):
    url = str(tmp_path)
    make_set(url, [1, 40, 5, 2])
    for workers in (0, 3):
        cfg = config(url, workers=workers, steps_per_epoch=7)
        counts = []
        for rank in range(3):
            loader = make_loader(cfg, 0, rank, 3)
            counts.append(sum(1 for _ in loader))
            assert len(loader) == 7
        assert counts == [7, 7, 7]


def test_one_shard_with_four_workers_does_not_hang(tmp_path):
    url = str(tmp_path)
    make_set(url, [5])
    loader = make_loader(config(url, workers=4, steps_per_epoch=9), 0, 0, 1)
    batches = list(loader)
    assert len(batches) == 9
    assert len({tuple(b.keys) for b in batches}) > 1  # workers entered the shard at different points
    assert loader.stats["batches"] == 9 and loader.stats["shards_skipped"] == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_views_are_fixed_shape_int16_crops_of_their_utterance(shard_set, workers):
    url, truth = shard_set
    cfg = config(url, views=[1.5, 0.5, 0.25], batch_size=5, steps_per_epoch=8, min_duration=1.2, workers=workers)
    loader = make_loader(cfg, 0, 0, 1)
    for batch in list(loader):  # held together: batches from workers must not share memory
        assert isinstance(batch, Batch)
        assert [tuple(v.shape) for v in batch.views] == [(5, 24000), (5, 8000), (5, 4000)]
        assert all(v.dtype == torch.int16 for v in batch.views)
        assert len(batch.keys) == len(batch.groups) == 5
        for row, key in enumerate(batch.keys):
            slope, phase, n = truth[key]
            whole = ramp(slope, phase, n)
            for view in batch.views:
                assert is_crop_of(view[row].numpy(), whole), key
    assert loader.stats["short_skipped"] > 0  # utterances under 1.2 s
    assert loader.stats["short_padded"] > 0  # 1.2-1.5 s utterances fill the 1.5 s view by repetition
    floats = views_to_device(batch, "cpu")
    assert all(f.dtype == torch.float32 and f.abs().max() <= 1.0 for f in floats)
    torch.testing.assert_close(floats[0] * 32768.0, batch.views[0].float())


def test_seek_reader_matches_decode_audio(shard_set):
    from voxstream.pipeline.views import read_spans
    from voxstream.shards.format import iter_samples

    url, _ = shard_set
    key, meta, flac = next(iter_samples(storage.join(url, shard_name("syn", 0))))
    n = meta["num_samples"]
    spans = [(0, 100), (300, 5000), (9000, 4000), (n - 1500, 1500)]
    for (start, frames), got in zip(spans, read_spans(key, flac, spans)):
        np.testing.assert_array_equal(got, decode_audio(flac, start, frames))


def test_seek_reader_rejects_what_it_cannot_crop_safely():
    from voxstream.pipeline.views import CorruptSample, read_spans

    flac = encode_flac(ramp(3, 0, SR))
    with pytest.raises(CorruptSample, match="u1: 8000 samples at 8000, expected 9000"):
        read_spans("u1", flac, [(8000, 9000)])  # past the end
    with pytest.raises(CorruptSample, match="u2: .*expected 16000"):
        read_spans("u2", flac[:len(flac) // 2], [(0, SR)])  # truncated
    with pytest.raises(CorruptSample, match="u3: not a FLAC"):
        read_spans("u3", b"RIFF" + bytes(100), [(0, 10)])
    buf = io.BytesIO()
    sf.write(buf, np.zeros((SR, 2), dtype=np.int16), SR, format="FLAC")
    with pytest.raises(CorruptSample, match="u4: 2 channels"):  # would overflow a mono buffer
        read_spans("u4", buf.getvalue(), [(0, 100)])


def test_cross_utterance_views_come_from_other_utterances_of_the_group(tmp_path):
    url = str(tmp_path)
    truth = make_set(url, [12, 12], group_size=3)
    make_set(str(tmp_path / "singles"), [6], group_size=1, corpus="one")
    cfg = config([url, str(tmp_path / "singles")], weights=[0.8, 0.2], mode="cross-utterance",
                 views=[0.5, 0.5, 0.25], steps_per_epoch=8)
    loader = make_loader(cfg, 0, 0, 1)
    checked = 0
    for batch in loader:
        for row, (key, group) in enumerate(zip(batch.keys, batch.groups)):
            slopes = [crop_slope(v[row].numpy()) for v in batch.views]
            if key.startswith("one/"):
                assert len(set(slopes)) == 1  # a one-utterance group falls back to same-utterance
                continue
            assert group == key.split("/")[2]
            assert slopes[0] == truth[key][0]  # the anchor gives the first view
            assert slopes[1] != slopes[0]  # the second comes from another utterance of the group
            assert set(slopes) <= {1, 2, 3}
            checked += 1
    assert checked > 10
    stats = loader.stats
    assert stats["fallbacks"] > 0 and 0 < stats["fallback_rate"] < 1


def test_a_misspelt_counter_raises_and_the_trainer_logs_the_same_names(tmp_path):
    stats = StreamStats()
    with pytest.raises(AttributeError, match="shards_skiped"):
        stats.shards_skiped += 1
    with pytest.raises(AttributeError, match="peak_rss"):
        stats.peak_rss = 1.0  # would otherwise become a field that nothing sums or logs
    url = str(tmp_path)
    make_set(url, [6])
    loader = make_loader(config(url, workers=1, steps_per_epoch=2), 0, 0, 1)
    list(loader)
    assert set(loader.stats) == {
        "shards_opened", "shards_skipped", "retries", "samples_read", "samples_skipped", "samples_incomplete",
        "samples_corrupt", "short_skipped", "short_padded", "unlabeled",
        "cross_items", "fallbacks", "batches", "dup_group_batches", "cpu_seconds",
        "peak_rss_mb", "peak_pss_mb", "peak_private_mb", "dup_group_rate", "fallback_rate",
        "pairs", "storage_requests", "storage_bytes", "crop_bytes", "requests_per_pair", "bytes_per_pair",
        "read_amplification", "workers"}
    assert loader.stats["batches"] == 2 and loader.stats["peak_rss_mb"] > 0


def test_group_aware_shuffle_avoids_two_samples_of_a_group_in_a_batch(tmp_path):
    url = str(tmp_path)
    make_set(url, [60], group_size=4)
    loader = make_loader(config(url, batch_size=6, shuffle_buffer=40, chunk_steps=4, steps_per_epoch=8), 0, 0, 1)
    for batch in loader:
        assert len(set(batch.groups)) == len(batch.groups)
    assert loader.stats["dup_group_rate"] == 0.0
    # with a buffer smaller than the batch there is no choice, and the rate says so
    loader = make_loader(config(url, batch_size=6, shuffle_buffer=2, steps_per_epoch=4), 0, 0, 1)
    list(loader)
    assert loader.stats["dup_group_rate"] > 0


def test_corpora_mix_with_weights(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_set(a, [20], corpus="aa")
    make_set(b, [20], corpus="bb")
    only_a = Counter(k.split("/")[0] for batch in make_loader(config([a, b], weights=[1, 0]), 0, 0, 1)
                     for k in batch.keys)
    assert set(only_a) == {"aa"}
    mixed = Counter(k.split("/")[0] for batch in make_loader(config([a, b], weights=[3, 1], steps_per_epoch=20), 0, 0, 1)
                    for k in batch.keys)
    assert mixed["aa"] > 2 * mixed["bb"] > 0


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_broken_shard_in_the_middle_is_skipped_and_counted(tmp_path, damage):
    url = str(tmp_path)
    make_set(url, [12, 12, 12], manifest=False)
    middle = tmp_path / shard_name("syn", 1)
    data = middle.read_bytes()
    if damage == "truncated":
        middle.write_bytes(data[: len(data) // 2 + 100])
    else:
        middle.write_bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    pattern = f"{url}/syn-{{000000..000002}}.tar"
    loader = make_loader(config(pattern, workers=2, chunk_steps=1, steps_per_epoch=12), 0, 0, 1)
    assert sum(1 for _ in loader) == 12  # the run goes on
    assert loader.stats["shards_skipped"] >= 1
    with pytest.raises(CorruptShard, match="syn-000001.tar"):
        list(make_loader(config(pattern, chunk_steps=1, steps_per_epoch=12, strict=True), 0, 0, 1))


def tamper(path, change) -> None:
    """Rewrite a tar shard member by member: change(name, data) gives the new bytes, or None to drop it."""
    with tarfile.open(path) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as out:
        for info, data in members:
            if (data := change(info.name, data)) is not None:
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))


def flip(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


def test_untrusted_samples_are_skipped_and_counted_once_from_every_entry_point(tmp_path):
    url = str(tmp_path)
    keys = list(make_set(url, [14], group_size=2))
    faults = {f"{keys[1]}.json": lambda d: b"[1, 2]", f"{keys[2]}.json": lambda d: b'"x"',
              f"{keys[4]}.json": lambda d: b"3", f"{keys[6]}.flac": lambda d: None,
              f"{keys[9]}.json": lambda d: None, f"{keys[11]}.flac": flip}
    path = tmp_path / shard_name("syn", 0)
    tamper(path, lambda name, data: faults.get(name, lambda d: d)(data))
    sound = sorted(set(keys) - {keys[i] for i in (1, 2, 4, 6, 9, 11)})
    for seed in range(60):  # entry points all over the shard, the cut samples among them
        stats = StreamStats()
        got = [s.key for s in visit(Shard(str(path)), np.random.default_rng(seed), None, stats, Retry())]
        assert sorted(got) == sound, seed
        assert (stats.samples_skipped, stats.samples_incomplete, stats.samples_corrupt) == (3, 2, 1), seed
    # the loader and training go on, and say what they skipped
    loader = make_loader(config(str(path), chunk_steps=4, steps_per_epoch=12), 0, 0, 1)
    assert sum(1 for _ in loader) == 12
    assert min(loader.stats[k] for k in ("samples_skipped", "samples_incomplete", "samples_corrupt")) > 0
    assert any("fail their crc32" in p for p in verify(url).problems)


def test_shards_written_before_the_crc32_are_read_whole(tmp_path):
    url = str(tmp_path)
    keys = make_set(url, [8])
    path = tmp_path / shard_name("syn", 0)

    def strip(name: str, data: bytes) -> bytes:
        if not name.endswith(".json"):
            return data
        meta = json.loads(data)
        assert isinstance(meta.pop("crc32"), int)
        return json.dumps(meta).encode()
    tamper(path, strip)
    stats = StreamStats()
    got = [s.key for s in visit(Shard(str(path)), np.random.default_rng(0), None, stats, Retry())]
    assert sorted(got) == sorted(keys)
    assert stats == StreamStats(storage_requests=stats.storage_requests, storage_bytes=stats.storage_bytes)  # none skipped


def test_shard_shorter_than_its_manifest_says_is_skipped(tmp_path):
    url = str(tmp_path)
    make_set(url, [12, 12, 12])
    middle = tmp_path / shard_name("syn", 1)
    middle.write_bytes(middle.read_bytes()[:-10240])  # cut at a member boundary: only the size tells
    loader = make_loader(config(url, chunk_steps=1, steps_per_epoch=12), 0, 0, 1)
    assert sum(1 for _ in loader) == 12
    assert loader.stats["shards_skipped"] >= 1


@pytest.mark.parametrize("workers", [0, 2])
def test_start_step_resumes_with_the_same_batches(shard_set, workers):
    url, _ = shard_set
    cfg = config(url, workers=workers, steps_per_epoch=9, chunk_steps=3)
    full = list(make_loader(cfg, 2, 1, 2))
    for start in (4, 7):
        resumed = list(make_loader(cfg, 2, 1, 2, start_step=start))
        assert len(resumed) == 9 - start
        for a, b in zip(full[start:], resumed):
            assert a.keys == b.keys
            for va, vb in zip(a.views, b.views):
                assert torch.equal(va, vb)


def test_a_stream_from_s3(s3_url, tmp_path):
    truth = make_set(s3_url, [10, 10])
    loader = make_loader(config(s3_url, workers=2, steps_per_epoch=6), 0, 0, 1)
    keys = [k for batch in loader for k in batch.keys]
    assert len(keys) == 24 and set(keys) <= set(truth)
    assert loader.stats["shards_skipped"] == 0


def test_bad_config_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="data.mode"):
        config("x", mode="nope")
    with pytest.raises(FileNotFoundError, match="no manifest"):
        make_loader(config(str(tmp_path)), 0, 0, 1)
    with pytest.raises(ValueError, match="data.weights"):
        make_loader(config([str(tmp_path)], weights=[1, 2]), 0, 0, 1)


def test_a_corpus_with_no_readable_shard_fails_instead_of_spinning(tmp_path):
    for i in range(2):
        (tmp_path / f"bad-{i:06d}.tar").write_bytes(b"\x01" * 4096)
    with pytest.raises(RuntimeError, match="no readable sample"):
        list(make_loader(config(f"{tmp_path}/bad-{{000000..000001}}.tar"), 0, 0, 1))


def test_shards_read_as_a_webdataset(shard_set):
    """The format is WebDataset's: its own reader sees one sample per utterance with .flac and .json."""
    import webdataset as wds

    url, truth = shard_set
    samples = list(wds.WebDataset(storage.join(url, shard_name("syn", 0)), shardshuffle=False))
    assert len(samples) == 24
    for sample in samples:
        slope, phase, n = truth[sample["__key__"]]
        assert json.loads(sample["json"])["num_samples"] == n
        np.testing.assert_array_equal(decode_audio(sample["flac"]), ramp(slope, phase, n))


def test_group_ids_are_equal_for_equal_names_in_every_process():
    ids = group_ids(Batch([], ["a", "b", "c"], ["s1", "s2", "s1"]), "cpu")
    assert ids.dtype == torch.int64 and ids[0] == ids[2] != ids[1] and (ids >= 0).all()
    code = "from voxstream.pipeline.loader import Batch, group_ids; print(group_ids(Batch([], [], ['s1']), 'cpu').item())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"})  # another rank: another str hash
    assert int(other.stdout) == ids[0].item()
