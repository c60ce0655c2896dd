"""The shard container format and storage round trips, locally and on a real S3 server."""
import io

import numpy as np
import pytest

from voxstream.shards import format as fmt
from voxstream.shards import storage


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
