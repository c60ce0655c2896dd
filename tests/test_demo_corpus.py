"""The synthetic demo corpus: determinism, VoxCeleb/MUSAN/RIRS_NOISES layout, trials, audio format."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from voxstream.model.baseline import baseline_eers, mfcc_stats, score_trials
from voxstream.model.evaluate import read_trials
from voxstream.shards.rirsim import simulate_rir
from voxstream.shards.synth.corpus import CorpusConfig, generate

ROOT = Path(__file__).resolve().parents[1]
TINY = CorpusConfig(speakers=2, test_speakers=3, sessions=2, utterances=2, noise_clips=2, music_clips=1,
                    speech_clips=1, rooms=1, rirs_per_room=2, seed=7)


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every file except corpus.json (it records timings)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "corpus.json"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    generate(TINY, out, workers=1)
    return out


def test_same_seed_gives_identical_bytes_with_any_number_of_workers(corpus, tmp_path):
    generate(TINY, tmp_path / "two", workers=2)
    assert _digests(corpus) == _digests(tmp_path / "two")


def test_different_seed_gives_different_audio(corpus, tmp_path):
    other = CorpusConfig(**{**TINY.__dict__, "seed": 8, "noise_clips": 0, "music_clips": 0,
                            "speech_clips": 0, "rooms": 0})
    generate(other, tmp_path / "other")
    mine, theirs = _digests(corpus), _digests(tmp_path / "other")
    speech = [k for k in theirs if k.startswith("wav/")]
    assert speech and all(mine[k] != theirs[k] for k in speech)


def test_speech_layout_format_and_durations(corpus):
    files = sorted((corpus / "wav").glob("*/*/*.wav"))
    assert len(files) == (TINY.speakers + TINY.test_speakers) * TINY.sessions * TINY.utterances
    assert {f.relative_to(corpus / "wav").parts[0] for f in files} == {f"id{i:05d}" for i in range(1, 6)}
    assert {f.parent.name for f in files} == {"s01", "s02"}
    assert {f.name for f in files} == {"00001.wav", "00002.wav"}
    for f in files:
        info = sf.info(f)
        assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "WAV")
        assert TINY.min_seconds <= info.duration <= TINY.max_seconds
        wave = sf.read(f, dtype="int16")[0]
        assert 0 < np.abs(wave).max() < 32767 and np.std(wave) > 30   # audible, never clipped


def test_musan_and_rir_trees_are_readable(corpus):
    for kind, count in (("noise", 2), ("music", 1), ("speech", 1)):
        files = sorted((corpus / "musan" / kind).rglob("*.wav"))
        assert len(files) == count, kind
        for f in files:
            wave, rate = sf.read(f)
            assert rate == 16000 and wave.size > 4 * rate and np.std(wave) > 1e-3
    for room_class in ("smallroom", "mediumroom"):
        files = sorted((corpus / "rirs" / "simulated_rirs" / room_class).glob("Room*/Room*-*.wav"))
        assert [f.relative_to(corpus / "rirs" / "simulated_rirs" / room_class).as_posix() for f in files] == \
            ["Room001/Room001-00001.wav", "Room001/Room001-00002.wav"]
        for f in files:
            rir, rate = sf.read(f)
            assert rate == 16000 and 100 < rir.size <= 16000 and abs(np.abs(rir).max() - 0.9) < 1e-3


def test_trials_cover_test_speakers_only_with_correct_labels(corpus):
    summary = json.loads((corpus / "corpus.json").read_text())
    test, train = set(summary["test_speakers"]), set(summary["train_speakers"])
    trials = read_trials(str(corpus / "trials.txt"))
    pairs = list(zip(trials.enroll, trials.test))
    assert len(set(pairs)) == len(pairs)
    same_session = 0
    for label, (a, b) in zip(trials.labels, pairs):
        assert (corpus / "wav" / a).is_file() and (corpus / "wav" / b).is_file()
        spk_a, spk_b = a.split("/")[0], b.split("/")[0]
        assert {spk_a, spk_b} <= test and not {spk_a, spk_b} & train
        assert label == (spk_a == spk_b)
        same_session += label == 1 and a.split("/")[1] == b.split("/")[1]
    # every target pair of 3 speakers x 4 utterances: 3 x 6, of which 3 x 2 within a session
    assert (trials.labels.sum(), same_session, len(pairs)) == (18, 6, 36)
    assert summary["trials"] == 36 and summary["utterances"] == 20


def test_existing_corpus_is_not_overwritten_silently(corpus):
    with pytest.raises(FileExistsError, match="not empty"):
        generate(TINY, corpus)


def test_baseline_scores_align_with_the_trial_list(corpus):
    assert mfcc_stats(np.zeros(16000, dtype=np.int16) + 1).shape == (38,)
    scores, labels, same = score_trials(corpus / "trials.txt", corpus / "wav")
    assert scores.shape == labels.shape == same.shape == (36,)
    assert np.all(np.abs(scores) <= 1 + 1e-9)
    assert same.sum() == 6 and not (same & (labels == 0)).any()
    assert scores[same].mean() > scores[labels == 0].mean()    # one channel and one speaker: similar


def test_simulated_rirs_follow_the_kaldi_ranges():
    rng = np.random.default_rng(0)
    for room_class, (lo, hi) in (("smallroom", (1, 10)), ("mediumroom", (10, 30))):
        rir, meta = simulate_rir(rng, room_class)
        assert rir.dtype == np.float32 and np.isclose(np.abs(rir).max(), 0.9)
        assert all(lo <= d <= hi for d in meta["dims"][:2]) and 2 <= meta["dims"][2] <= 5
        assert 0.2 <= meta["absorption"] <= 0.8 and meta["distance"] <= 5.0
        same_room = simulate_rir(rng, room_class, meta)[1]
        assert (same_room["dims"], same_room["absorption"]) == (meta["dims"], meta["absorption"])
    again = simulate_rir(np.random.default_rng(0), "smallroom")[0]
    assert np.array_equal(again, simulate_rir(np.random.default_rng(0), "smallroom")[0])
    with pytest.raises(ValueError, match="largeroom"):
        simulate_rir(rng, "largeroom")


@pytest.mark.slow
def test_default_corpus_is_neither_trivial_nor_impossible(tmp_path):
    """The command-line default corpus: MFCC-baseline EER 10-35 %, cross-session clearly harder."""
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "make_demo_corpus.py"), "--out", str(out)],
                         capture_output=True, text=True, check=True)
    assert "20 test speakers" in run.stdout
    eers = baseline_eers(out / "trials.txt", out / "wav")
    assert 10 <= eers["all"] <= 35, eers
    assert eers["cross_session"] > eers["same_session"] + 5, eers
