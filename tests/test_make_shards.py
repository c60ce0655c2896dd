"""make_shards.py end to end on generated audio: coverage, bit-exactness, grouping, resume, S3, bad inputs."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from voxstream.shards import format as fmt
from voxstream.shards import storage, writer
from voxstream.shards.verify import verify

_spec = importlib.util.spec_from_file_location("make_shards", Path(__file__).parents[1] / "tools" / "make_shards.py")
make_shards = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_shards)

LIBRI = r"(?P<speaker>\d+)/(?P<session>\d+)/[^/]+$"


def speech(rng: np.random.Generator, seconds: float, rate: int = 16000, channels: int = 1) -> np.ndarray:
    """Bursts of shaped noise separated by quiet gaps: speech-like energy for the cutter and FLAC."""
    n = int(seconds * rate)
    envelope = (np.sin(np.arange(n) / rate * 2 * np.pi * 1.3) > -0.3).astype(np.float32)
    wave = rng.standard_normal((n, channels)).astype(np.float32) * 0.2 * envelope[:, None]
    return wave[:, 0] if channels == 1 else wave


def write(path: Path, wave: np.ndarray, rate: int = 16000, subtype: str = "PCM_16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave, rate, subtype=subtype)
    return path


def corpus(root: Path, speakers: int = 3, sessions: int = 2, utts: int = 3, seed: int = 0) -> list[Path]:
    """<speaker>/<session>/<speaker>-<session>-<n>.flac, LibriSpeech style, 0.6-1.5 s each."""
    rng = np.random.default_rng(seed)
    return [write(root / f"{s}" / f"{s}{c}" / f"{s}-{s}{c}-{u:04d}.flac", speech(rng, rng.uniform(0.6, 1.5)))
            for s in range(100, 100 + speakers) for c in range(sessions) for u in range(utts)]


def run(*argv: str) -> int:
    return make_shards.main([str(a) for a in argv])


def samples(url: str) -> list[fmt.Sample]:
    return [s for shard in fmt.shard_urls(url) for s in fmt.iter_samples(shard)]


def expected_int16(path: Path) -> np.ndarray:
    """The input resampled to 16 kHz and downmixed, computed here independently of shards.audio."""
    wave, rate = sf.read(path, dtype="float32", always_2d=True)
    mono = torch.from_numpy(np.ascontiguousarray(wave.mean(axis=1, dtype=np.float32)))
    if rate != 16000:
        mono = AF.resample(mono, rate, 16000)
    return np.clip(np.round(mono.numpy().astype(np.float64) * 32768), -32768, 32767).astype(np.int16)


def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_every_input_once_bit_exact_and_groups_contiguous(tmp_path):
    root = tmp_path / "src"
    inputs = corpus(root)
    rng = np.random.default_rng(1)
    inputs += [write(root / "200" / "2000" / "200-2000-0000.wav", speech(rng, 1.0, 8000), 8000),
               write(root / "200" / "2000" / "200-2000-0001.wav", speech(rng, 1.0, 48000, 2), 48000),
               write(root / "200" / "2001" / "200-2001-0000.ogg", speech(rng, 1.0, 22050), 22050, "VORBIS"),
               write(root / "200" / "2001" / "200-2001-0001.mp3", speech(rng, 1.0, 44100), 44100, "MPEG_LAYER_III")]
    out = tmp_path / "out"
    assert run("folder", "--root", root, "--pattern", LIBRI, "--out", out, "--shard-size", "200k") == 0

    got = samples(str(out))
    assert sorted(s.meta["source"] for s in got) == sorted(str(p.relative_to(root)) for p in inputs)
    assert len({s.key for s in got}) == len(inputs)
    for key, meta, flac in got:
        source = root / meta["source"]
        wave = fmt.decode_audio(flac)
        if source.suffix == ".flac":  # 16 kHz 16-bit mono: the stored samples are the file's samples
            assert np.array_equal(wave, sf.read(source, dtype="int16")[0]), key
        assert np.array_equal(wave, expected_int16(source)), key
        assert meta["num_samples"] == len(wave) and meta["sample_rate"] == 16000
        assert key == f"folder/{meta['speaker']}/{meta['session']}/{Path(meta['source']).stem}"
        assert meta["group"] == f"folder/{meta['speaker']}/{meta['session']}"

    # groups contiguous within shards, never split across shards (each fits one), several shards
    manifest = fmt.read_manifest(str(out))
    assert len(manifest.shards) > 2 and all(s["bytes"] <= 200 * 1024 + 10240 for s in manifest.shards)
    homes = {}
    for url in fmt.shard_urls(str(out)):
        runs = [s.meta["group"] for s in fmt.iter_samples(url)]
        runs = [g for i, g in enumerate(runs) if i == 0 or runs[i - 1] != g]
        assert len(runs) == len(set(runs))
        for g in runs:
            assert homes.setdefault(g, url) == url
    assert verify(str(out)).ok


def test_seed_shuffles_groups_globally_and_big_groups_split_only_between_neighbours(tmp_path):
    root = tmp_path / "src"
    corpus(root, speakers=4, sessions=3, utts=2)
    order = {}
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        assert run("folder", "--root", root, "--pattern", LIBRI, "--out", out, "--seed", seed) == 0
        keys = [s.meta["group"] for s in samples(str(out))]
        order[seed] = list(dict.fromkeys(keys))
    assert sorted(order[0]) == sorted(order[1]) and order[0] != order[1]
    assert order[0] != sorted(order[0])

    # one speaker = one group of ~6 s, larger than a 60 kB shard: it spans neighbouring shards only
    out = tmp_path / "big"
    assert run("folder", "--root", root, "--pattern", r"(?P<speaker>\d+)/", "--out", out, "--shard-size", "60k") == 0
    report = verify(str(out))
    assert report.ok, report.problems
    groups_per_shard = [[s.meta["group"] for s in fmt.iter_samples(u)] for u in fmt.shard_urls(str(out))]
    assert any(len(set(g)) == 1 for g in groups_per_shard) and len(groups_per_shard) > 4


def test_resume_after_failure_equals_uninterrupted_run(tmp_path, monkeypatch):
    root = tmp_path / "src"
    corpus(root, speakers=4)
    write(root / "999" / "9990" / "999-9990-0000.wav", np.zeros(16000, np.float32))  # a rejection to carry over
    args = ["folder", "--root", root, "--pattern", LIBRI, "--shard-size", "120k", "--seed", "3"]
    assert run(*args, "--out", tmp_path / "clean") == 0
    clean = files_of(tmp_path / "clean")
    assert len([n for n in clean if n.endswith(".tar")]) >= 5

    real_write, shard_writes = storage.write_bytes, []

    def failing_write(url, data, storage_options=None):
        if url.endswith(".tar"):
            shard_writes.append(url)
            if len(shard_writes) == 4:
                raise RuntimeError("injected failure while writing the 4th shard")
        real_write(url, data, storage_options)

    monkeypatch.setattr(storage, "write_bytes", failing_write)
    with pytest.raises(RuntimeError, match="injected"):
        run(*args, "--out", tmp_path / "resumed")
    monkeypatch.setattr(storage, "write_bytes", real_write)
    partial = files_of(tmp_path / "resumed")
    assert "manifest.json" not in partial and writer.PROGRESS in partial
    assert run(*args, "--out", tmp_path / "resumed") == 2  # refuses to overwrite without --resume

    kept = {n: (tmp_path / "resumed" / n).stat().st_mtime_ns for n in partial if n.endswith(".tar")}
    (tmp_path / "resumed" / "folder-000003.tar.tmp-0badf00d").write_bytes(b"half a shard")  # as after a kill
    assert run(*args, "--out", tmp_path / "resumed", "--resume") == 0
    assert files_of(tmp_path / "resumed") == clean
    assert all((tmp_path / "resumed" / n).stat().st_mtime_ns == t for n, t in kept.items())
    assert run(*args, "--out", tmp_path / "resumed", "--resume") == 0  # finished set: nothing to do
    assert files_of(tmp_path / "resumed") == clean


def test_transient_write_errors_are_retried_as_the_flags_say(tmp_path, monkeypatch, capsys):
    root = tmp_path / "src"
    corpus(root, speakers=1, sessions=1)
    real_write, calls = storage.write_bytes, []

    def flaky(url, data, storage_options=None):
        calls.append(url)
        if url.endswith(".tar") and calls.count(url) < 3:
            raise ConnectionError("connection reset by peer")
        real_write(url, data, storage_options)

    monkeypatch.setattr(storage, "write_bytes", flaky)
    args = ["folder", "--root", root, "--retry-backoff", "0"]
    assert run(*args, "--out", tmp_path / "out", "--retry-attempts", "3") == 0
    assert verify(str(tmp_path / "out")).ok
    shard = str(tmp_path / "out" / fmt.shard_name("folder", 0))
    assert calls.count(shard) == 3
    assert f"write {shard}: connection reset by peer; attempt 2/3 failed" in capsys.readouterr().err

    assert run(*args, "--out", tmp_path / "again", "--retry-attempts", "2") == 1
    shard = str(tmp_path / "again" / fmt.shard_name("folder", 0))
    assert (f"write {shard}: gave up after 2 attempts: connection reset by peer; rerun with --resume"
            in capsys.readouterr().err)


def test_bad_inputs_are_rejected_with_reasons_and_good_ones_converted(tmp_path):
    root = tmp_path / "src"
    rng = np.random.default_rng(2)
    write(root / "ok16k.wav", speech(rng, 1.0))
    write(root / "tel8k.wav", speech(rng, 1.0, 8000), 8000)
    write(root / "stereo.wav", speech(rng, 1.0, 16000, 2))
    write(root / "hi48k.flac", speech(rng, 1.0, 48000), 48000)
    write(root / "silent.wav", np.zeros(16000, np.float32))
    write(root / "short.wav", speech(rng, 0.1))
    (root / "notes.wav").write_text("this is a text file, not audio\n")
    (root / "empty.wav").write_bytes(b"")
    good = (root / "ok16k.wav").read_bytes()
    (root / "corrupt.flac").write_bytes(b"fLaC" + good[200:4000])
    out = tmp_path / "out"
    assert run("folder", "--root", root, "--out", out) == 0

    rejected = {r["source"]: r["reason"] for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}
    assert set(rejected) == {"silent.wav", "short.wav", "notes.wav", "empty.wav", "corrupt.flac"}
    assert rejected["silent.wav"].startswith("silent")
    assert rejected["short.wav"].startswith("too short: 0.100 s")
    assert rejected["empty.wav"] == "empty file (0 bytes)"
    assert rejected["notes.wav"].startswith("unreadable or not audio")
    assert rejected["corrupt.flac"].startswith("unreadable or not audio")
    got = {s.meta["source"]: s.meta for s in samples(str(out))}
    assert set(got) == {"ok16k.wav", "tel8k.wav", "stereo.wav", "hi48k.flac"}
    assert all(m["num_samples"] == 16000 and m["speaker"] is None for m in got.values())
    assert fmt.read_manifest(str(out)).params["rejected"] == 5

    for name in ("ok16k.wav", "tel8k.wav", "stereo.wav", "hi48k.flac"):
        (root / name).unlink()
    assert run("folder", "--root", root, "--out", tmp_path / "none") == 2  # nothing usable: no manifest
    assert not (tmp_path / "none" / "manifest.json").exists()
    assert len((tmp_path / "none" / "rejected.jsonl").read_text().splitlines()) == 5


@pytest.mark.parametrize("case, message", [
    ("missing", "no such directory"),
    ("empty", "no audio files"),
    ("pattern", "--pattern"),
])
def test_bad_input_stops_with_one_clear_line(tmp_path, capsys, case, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no audio here")
    write(tmp_path / "one" / "a.wav", speech(np.random.default_rng(0), 1.0))
    argv = {"missing": ["folder", "--root", tmp_path / "nope"],
            "empty": ["folder", "--root", tmp_path / "empty"],
            "pattern": ["folder", "--root", tmp_path / "one", "--pattern", "(?P<speaker"]}[case]
    assert run(*argv, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("make_shards.py: error:") and message in err[0]
    assert not (tmp_path / "out").exists()


def test_bad_storage_options_are_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run("folder", "--root", tmp_path, "--out", tmp_path / "out", "--storage-options", "[1]")
    assert exit_.value.code == 2 and "must be a JSON object" in capsys.readouterr().err


def test_long_files_are_cut_at_quiet_points_without_losing_samples(tmp_path):
    rng = np.random.default_rng(3)
    wave = speech(rng, 70.0)
    source = write(tmp_path / "src" / "talk.flac", wave)
    out = tmp_path / "out"
    assert run("folder", "--root", tmp_path / "src", "--out", out, "--max-duration", "20") == 0
    got = sorted(samples(str(out)), key=lambda s: s.meta["start"])
    assert len(got) == 4 and {s.meta["group"] for s in got} == {"folder/talk"}
    pieces = [fmt.decode_audio(s.flac) for s in got]
    assert np.array_equal(np.concatenate(pieces), sf.read(source, dtype="int16")[0])
    assert all(10 <= len(p) / 16000 <= 20 for p in pieces[:-1])
    quiet = np.abs(np.concatenate(pieces).astype(np.int32))
    for _, meta, _ in got[1:]:  # every cut falls in a gap of the speech-like signal
        at = int(meta["start"] * 16000)
        assert quiet[at:at + 160].max() == 0


def test_voxceleb_layout_and_excluded_trial_speakers(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(4)
    root = tmp_path / "vox1"
    for spk in ("id10001", "id10002", "id10270"):
        for video in ("abcDEF_123", "xyz-789"):
            write(root / "wav" / spk / video / "00001.wav", speech(rng, 0.8))
    trials = tmp_path / "veri_test.txt"
    trials.write_text("1 id10270/abcDEF_123/00001.wav id10270/xyz-789/00001.wav\n")
    out = tmp_path / "out"
    assert run("voxceleb", "--root", root, "--out", out, "--exclude-speakers", trials) == 0
    got = {s.key: s.meta for s in samples(str(out))}
    assert sorted(got)[0] == "voxceleb/id10001/abcDEF_123/00001"
    assert {m["speaker"] for m in got.values()} == {"id10001", "id10002"} and len(got) == 4
    assert got["voxceleb/id10002/xyz-789/00001"]["group"] == "voxceleb/id10002/xyz-789"
    assert fmt.read_manifest(str(out)).params["excluded_utterances"] == 2

    (root / "wav" / "id10001" / "abcDEF_123" / "00002.m4a").write_bytes(b"\0" * 64)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    assert run("voxceleb", "--root", root, "--out", tmp_path / "out2") == 2
    assert "no ffmpeg is on PATH" in capsys.readouterr().err and not (tmp_path / "out2").exists()


def test_voxceleb2_m4a_is_decoded_through_ffmpeg(tmp_path, monkeypatch):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")  # ships a real ffmpeg binary
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ffmpeg").symlink_to(imageio_ffmpeg.get_ffmpeg_exe())
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    wav = write(tmp_path / "x.wav", speech(np.random.default_rng(6), 1.0, 44100), 44100)
    m4a = tmp_path / "vox2" / "dev" / "aac" / "id00012" / "21Uxsk56VDQ" / "00001.m4a"
    m4a.parent.mkdir(parents=True)
    subprocess.run(["ffmpeg", "-v", "error", "-i", wav, "-c:a", "aac", m4a], check=True)
    subprocess.run(["ffmpeg", "-v", "error", "-i", m4a, tmp_path / "decoded.wav"], check=True)
    assert run("voxceleb", "--root", tmp_path / "vox2", "--out", tmp_path / "out") == 0
    ((key, meta, flac),) = samples(str(tmp_path / "out"))
    assert key == "voxceleb/id00012/21Uxsk56VDQ/00001" and meta["source"].endswith(".m4a")
    assert np.array_equal(fmt.decode_audio(flac), expected_int16(tmp_path / "decoded.wav"))


def test_musan_and_rir_metadata(tmp_path):
    rng = np.random.default_rng(5)
    musan = tmp_path / "musan"
    for kind, subset in (("music", "fma"), ("noise", "free-sound"), ("speech", "librivox")):
        write(musan / kind / subset / f"{kind}-0001.wav", speech(rng, 1.0))
    write(musan / "noise" / "loose.wav", speech(rng, 1.0))
    write(musan / "extra" / "other.wav", speech(rng, 1.0))
    (musan / "README").write_text("MUSAN")
    assert run("musan", "--root", musan, "--out", tmp_path / "m") == 0
    kinds = {s.key: s.meta["kind"] for s in samples(str(tmp_path / "m"))}
    assert kinds == {"musan/unknown/fma/music-0001": "music", "musan/unknown/free-sound/noise-0001": "noise",
                     "musan/unknown/librivox/speech-0001": "speech", "musan/unknown/noise/loose": "noise"}
    assert "extra/other.wav" in (tmp_path / "m" / "rejected.jsonl").read_text()

    rirs = tmp_path / "RIRS_NOISES"
    decay = (rng.standard_normal(4000) * np.exp(-np.arange(4000) / 500) * 0.5).astype(np.float32)
    for size in ("small", "medium", "large"):
        for room in ("Room001", "Room002"):
            write(rirs / "simulated_rirs" / f"{size}room" / room / f"{room}-00001.wav", decay)
    two_mics = np.stack([decay, -decay * 0.1], axis=1)
    write(rirs / "real_rirs_isotropic_noises" / "RVB2014_type1_rir_largeroom1_near_angla.wav", two_mics)
    write(rirs / "real_rirs_isotropic_noises" / "RVB2014_type1_noise_largeroom1_1.wav", two_mics)
    assert run("rir", "--root", rirs, "--out", tmp_path / "r") == 0
    got = {s.key: (s.meta, s.flac) for s in samples(str(tmp_path / "r"))}
    assert len(got) == 7 and {m["kind"] for m, _ in got.values()} == {"rir"}
    assert got["rir/unknown/mediumroom_Room002/Room002-00001"][0]["room"] == "medium"
    real_meta, real_flac = got["rir/unknown/real/RVB2014_type1_rir_largeroom1_near_angla"]
    assert real_meta["room"] == "large"
    assert np.array_equal(fmt.decode_audio(real_flac), expected_int16(rirs / "simulated_rirs" / "smallroom" /
                                                                        "Room001" / "Room001-00001.wav"))
    rejected = (tmp_path / "r" / "rejected.jsonl").read_text()
    assert "noise_largeroom1_1.wav" in rejected and "not an RIR" in rejected


def test_simulated_rirs_are_deterministic_rooms(tmp_path):
    args = ["simulate-rir", "--count", "3", "--per-room", "2", "--seed", "7"]
    assert run(*args, "--out", tmp_path / "a") == 0
    assert run(*args, "--out", tmp_path / "b") == 0
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")
    got = samples(str(tmp_path / "a"))
    rooms = {}
    for key, meta, flac in got:
        assert meta["kind"] == "rir" and meta["room"] in ("small", "medium")
        rooms.setdefault(meta["group"], set()).add((tuple(meta["simulation"]["dims"]), meta["room"]))
        assert np.abs(fmt.decode_audio(flac)).max() > 0.8 * 32767
    assert len(rooms) == 2 and all(len(v) == 1 for v in rooms.values())
    assert {next(iter(v))[1] for v in rooms.values()} == {"small", "medium"}


def test_verify_detects_tampering(tmp_path, capsys):
    root = tmp_path / "src"
    corpus(root, speakers=2, sessions=1)
    out = tmp_path / "out"
    assert run("folder", "--root", root, "--pattern", LIBRI, "--out", out, "--shard-size", "30k") == 0
    assert run("verify", out) == 0
    first = out / fmt.shard_name("folder", 0)
    data = bytearray(first.read_bytes())
    data[3000] ^= 0xFF  # inside the first FLAC payload
    first.write_bytes(bytes(data))
    assert run("verify", out) == 1
    printed = capsys.readouterr().out
    assert "folder-000000.tar: sha256 differs from the manifest" in printed and "FAILED" in printed

    (out / fmt.shard_name("folder", 99)).write_bytes(b"")
    (out / fmt.MANIFEST).unlink()
    assert run("verify", out) == 1
    assert "no manifest" in capsys.readouterr().out


def test_s3_round_trip_write_verify_list(tmp_path, s3_url):
    root = tmp_path / "src"
    corpus(root, speakers=2)
    write(root / "300" / "3000" / "300-3000-0000.wav", np.zeros(8000, np.float32))
    assert run("folder", "--root", root, "--pattern", LIBRI, "--out", s3_url, "--shard-size", "40k") == 0
    assert run("verify", s3_url) == 0
    fs, path = storage.filesystem(s3_url)
    listed = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False, refresh=True))
    names = [s["name"] for s in fmt.read_manifest(s3_url).shards]
    assert listed == sorted(names + [fmt.MANIFEST, fmt.REJECTED]) and len(names) >= 2
    assert len(samples(s3_url)) == 12
    assert json.loads(storage.read_bytes(f"{s3_url}/{fmt.REJECTED}").splitlines()[0])["reason"].startswith("silent")
    local = tmp_path / "local"
    assert run("folder", "--root", root, "--pattern", LIBRI, "--out", local, "--shard-size", "40k") == 0
    assert all(storage.read_bytes(f"{s3_url}/{n}") == (local / n).read_bytes() for n in names + [fmt.MANIFEST])
