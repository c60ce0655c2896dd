"""The shard container format, storage round trips (locally and on a real S3 server), and the one
retry policy of every shard reader and writer."""
import io
import logging

import aiohttp
import botocore.exceptions
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileOpener

from voxstream.model.embeddings import ShardAudio
from voxstream.pipeline.banks import NOISE_KINDS, Bank, write_clip_set
from voxstream.pipeline.sources import resolve
from voxstream.pipeline.stats import StreamStats
from voxstream.pipeline.stream import visit
from voxstream.shards import format as fmt
from voxstream.shards import storage
from voxstream.shards.storage import Retry


def _samples(n=3):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        wave = (rng.standard_normal(16000 + 100 * i) * 2000).astype(np.int16)
        meta = {"utt": f"u{i}", "group": f"g{i // 2}", "duration": len(wave) / 16000}
        out.append((fmt.sample_key("c", "spk.1", "sess", f"u{i}"), meta, fmt.encode_flac(wave), wave))
    return out


def test_key_has_no_dots():
    assert fmt.sample_key("vox", "id.1", None, "0001.wav") == "vox/id_1/unknown/0001_wav"


def test_flac_round_trip_and_seek():
    _, _, flac, wave = _samples(1)[0]
    assert np.array_equal(fmt.decode_audio(flac), wave)
    assert np.array_equal(fmt.decode_audio(flac, 5000, 3000), wave[5000:8000])
    assert fmt.audio_frames(flac) == len(wave)


def test_shard_is_deterministic_and_readable():
    samples = [s[:3] for s in _samples()]
    a, stats = fmt.build_shard(samples, "x-000000.tar")
    b, _ = fmt.build_shard(samples, "x-000000.tar")
    assert a == b
    assert (stats.samples, stats.groups) == (3, 2)
    got = list(fmt.iter_tar(io.BytesIO(a)))
    assert [k for k, _ in got] == [k for k, _, _ in samples]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_manifest_round_trip(where, tmp_path, request):
    url = str(tmp_path / "set") if where == "local" else request.getfixturevalue("s3_url")
    data, stats = fmt.build_shard([s[:3] for s in _samples()], fmt.shard_name("x", 0))
    storage.write_bytes(storage.join(url, stats.name), data)
    with pytest.raises(FileNotFoundError, match="no manifest"):
        fmt.read_manifest(url)
    fmt.write_manifest(url, fmt.Manifest(corpus="c", prefix="x", shards=[vars(stats)]))
    assert fmt.read_manifest(url).samples == 3
    (shard_url,) = fmt.shard_urls(url)
    assert [m["utt"] for _, m, _ in fmt.iter_samples(shard_url)] == ["u0", "u1", "u2"]


def test_keys_too_long_for_the_name_field_read_back_with_every_reader(tmp_path):
    """Keys past tar's 100-character name field go to the ustar prefix field, which webdataset's reader,
    ours and the loader workers' random-entry reader all parse (the workers' reader skips pax headers)."""
    import webdataset as wds

    samples = [(fmt.sample_key("corpus", "s" * 60, "t" * 60, f"u{i}"), meta, flac) for i, (_, meta, flac, _)
               in enumerate(_samples())]
    keys = [k for k, _, _ in samples]
    assert len(keys[0]) > 100
    data, _ = fmt.build_shard(samples, "x-000000.tar")
    path = tmp_path / "x-000000.tar"
    path.write_bytes(data)
    assert [s["__key__"] for s in wds.WebDataset(str(path), shardshuffle=False)] == keys
    assert [k for k, _ in fmt.iter_tar(io.BytesIO(data))] == keys
    (shard,) = resolve(str(path)).shards
    assert sorted(k for k, _, _ in visit(shard, np.random.default_rng(0), None, StreamStats(), Retry())) == keys


def _flaky(fails: int, error: OSError = ConnectionResetError("connection reset by peer")):
    """An action that fails `fails` times, then returns how many calls it took."""
    calls = []

    def action():
        calls.append(1)
        if len(calls) <= fails:
            raise error
        return len(calls)
    return action


@pytest.fixture
def sleeps(monkeypatch):
    slept = []
    monkeypatch.setattr(storage.time, "sleep", slept.append)
    return slept


def test_transient_errors_are_retried_with_growing_jittered_delays_each_logged(sleeps, caplog):
    with caplog.at_level(logging.WARNING, logger=storage.__name__):
        assert Retry(attempts=5, backoff=0.1).call(_flaky(3), "read s3://b/x.tar") == 4
    assert len(sleeps) == 3
    for attempt, delay in enumerate(sleeps):
        assert 0.05 * 2 ** attempt <= delay <= 0.15 * 2 ** attempt
    assert sleeps != [0.1, 0.2, 0.4]  # jittered
    assert [r.getMessage() for r in caplog.records] == [
        f"read s3://b/x.tar: connection reset by peer; attempt {i}/5 failed, retrying in {d:.2f} s"
        for i, d in enumerate(sleeps, 1)]


@pytest.mark.parametrize("error", [FileNotFoundError("gone"), PermissionError("denied"), ValueError("bad")])
def test_permanent_errors_are_not_retried(error, sleeps, caplog):
    with pytest.raises(type(error)):
        Retry(attempts=5).call(_flaky(1, error), "open x")
    assert not sleeps and not caplog.records


CLIENT_ERRORS = {  # what s3fs lets through when the server is down, restarting or cuts a response (its
    # timeouts, botocore's ConnectTimeoutError and ReadTimeoutError, happen to be OSError already)
    "endpoint": lambda: botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b/x"),
    "streaming": lambda: botocore.exceptions.ResponseStreamingError(error="connection reset"),
    "closed": lambda: botocore.exceptions.ConnectionClosedError(endpoint_url="http://127.0.0.1:9/b/x"),
    "disconnected": lambda: aiohttp.ServerDisconnectedError(),
    "payload": lambda: aiohttp.ClientPayloadError("response payload is not completed"),
}


@pytest.mark.parametrize("kind", CLIENT_ERRORS)
def test_the_s3_clients_connection_errors_are_transient(kind, sleeps, caplog):
    error = CLIENT_ERRORS[kind]()
    assert not isinstance(error, OSError)  # why they need naming: OSError alone misses them
    with caplog.at_level(logging.WARNING, logger=storage.__name__):
        assert Retry(attempts=3, backoff=0.1).call(_flaky(2, error), "read s3://b/x.tar") == 3
    assert len(sleeps) == 2 and all(str(error) in m for m in caplog.messages) and len(caplog.messages) == 2
    with pytest.raises(OSError, match="gave up after 2 attempts") as info:
        Retry(attempts=2, backoff=0.1).call(_flaky(5, error), "read s3://b/x.tar")
    assert info.value.__cause__ is error


def test_a_client_error_that_retrying_cannot_fix_is_raised_at_once(sleeps):
    error = botocore.exceptions.NoCredentialsError()
    with pytest.raises(botocore.exceptions.NoCredentialsError):
        Retry(attempts=5).call(_flaky(1, error), "open s3://b/x.tar")
    assert not sleeps


def test_the_default_waits_outlast_a_one_minute_restart():
    retry = Retry()
    shortest = sum(0.5 * retry.backoff * 2 ** i for i in range(retry.attempts - 1))  # jitter at its lowest
    assert shortest >= 60


def test_giving_up_raises_the_last_error_with_what_was_tried(sleeps):
    calls = []

    def always_reset():
        calls.append(1)
        raise ConnectionResetError(f"reset {len(calls)}")

    with pytest.raises(OSError, match=r"^write s3://b/x\.tar: gave up after 3 attempts: reset 3$") as info:
        Retry(attempts=3, backoff=1.0).call(always_reset, "write s3://b/x.tar")
    assert str(info.value.__cause__) == "reset 3" and len(calls) == 3 and len(sleeps) == 2
    with pytest.raises(ValueError, match="attempts 0"):
        Retry(attempts=0)


def test_iterate_resumes_after_the_items_already_given(sleeps, caplog):
    failures = [4, 7]  # the first pass fails before item 4, the second before item 7

    def items():
        for i in range(10):
            if failures and i == failures[0]:
                failures.pop(0)
                raise TimeoutError(f"timed out before item {i}")
            yield i

    with caplog.at_level(logging.WARNING, logger=storage.__name__):
        assert list(Retry(attempts=3).iterate(items, "read x")) == list(range(10))
    assert [m.split("; ")[1].split(" failed")[0] for m in caplog.messages] == ["attempt 1/3", "attempt 2/3"]
    assert len(sleeps) == 2


@pytest.fixture
def flaky_reads(monkeypatch):
    """Reads of local .tar files at or past byte `at` fail with a connection reset, the first `times` times."""
    real_read = LocalFileOpener.read

    def arm(at: int, times: int) -> list[int]:
        left = [times]

        def read(self, *args, **kwargs):
            if self.path.endswith(".tar") and self.tell() >= at and left[0]:
                left[0] -= 1
                raise ConnectionResetError(f"connection reset at byte {self.tell()}")
            return real_read(self, *args, **kwargs)
        monkeypatch.setattr(LocalFileOpener, "read", read)
        return left
    return arm


READERS = {
    "stream": lambda url, retry: [k for k, _, _ in visit(resolve(url).shards[0], np.random.default_rng(0), None,
                                                        StreamStats(), retry)],
    "bank": lambda url, retry: Bank.from_shards(url, NOISE_KINDS, 4000, 1 << 30, "cpu", retry=retry).data.tolist(),
    "ShardAudio": lambda url, retry: [i for i, _ in ShardAudio(url, lambda key: key, workers=1, retry=retry)],
}


@pytest.mark.parametrize("reader", READERS)
def test_a_shard_read_that_fails_midway_is_retried_by_every_reader(reader, tmp_path, flaky_reads, sleeps, caplog):
    rng = np.random.default_rng(0)
    url = str(tmp_path / "set")
    write_clip_set(url, "noise", [("noise", (rng.standard_normal(8000) * 3000).astype(np.int16)) for _ in range(12)])
    read = READERS[reader]
    clean = read(url, Retry())
    size = (tmp_path / "set" / fmt.shard_name("noise", 0)).stat().st_size
    left = flaky_reads(at=size // 2, times=2)
    with caplog.at_level(logging.WARNING):
        assert read(url, Retry(attempts=3)) == clean
    assert left == [0] and len(sleeps) == 2
    assert sum("connection reset" in m and "attempt" in m for m in caplog.messages) == 2


def test_the_recipes_retry_keys_reach_the_stream_and_the_banks(tmp_path, flaky_reads, sleeps):
    """data.retry_* and augment.retry_* are the policies the loader and the banks use."""
    from voxstream.pipeline.augment import AugmentConfig, Augmenter
    from voxstream.pipeline.loader import DataConfig, make_loader

    rng = np.random.default_rng(0)
    url = str(tmp_path / "set")
    write_clip_set(url, "noise", [("noise", (rng.standard_normal(8000) * 3000).astype(np.int16)) for _ in range(12)])
    data = dict(train=url, views=[0.25, 0.25], batch_size=4, workers=0, shuffle_buffer=8, steps_per_epoch=2,
                chunk_steps=2, min_duration=0.3, strict=True)
    flaky_reads(at=0, times=2)
    assert len(list(make_loader(DataConfig(**data, retry_attempts=3), 0, 0, 1))) == 2
    flaky_reads(at=0, times=2)
    with pytest.raises(OSError, match="gave up after 2 attempts"):
        list(make_loader(DataConfig(**data, retry_attempts=2), 0, 0, 1))
    flaky_reads(at=0, times=2)
    assert Augmenter.from_config(AugmentConfig(noise=url, retry_attempts=3), "cpu").noise.counts()[0] == 12
    flaky_reads(at=0, times=2)
    with pytest.raises(ValueError, match="no samples"):  # its only shard skipped after 2 attempts
        Augmenter.from_config(AugmentConfig(noise=url, retry_attempts=2), "cpu")
    with pytest.raises(ValueError, match="data.retry_attempts must be >= 1"):
        DataConfig(**data, retry_attempts=0)
