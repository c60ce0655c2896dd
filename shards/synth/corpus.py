"""Write the synthetic demo corpus: VoxCeleb1-style speech, a MUSAN-like tree, RIRs and trials.

Layout under the output folder:
    wav/<id>/<session>/<nnnnn>.wav                 training and test speakers (16 kHz, 16-bit)
    trials.txt                                     `label enroll test`, paths relative to wav/,
                                                   test speakers only (exclude them when sharding)
    musan/{noise,music,speech}/synth/<cat>-synth-NNNN.wav
    rirs/simulated_rirs/{smallroom,mediumroom}/RoomNNN/RoomNNN-NNNNN.wav
    corpus.json                                    parameters, speaker split, counts; written last

Every job (one speaker, one noise clip, one room, ...) draws from its own generator seeded by
(seed, job kind, index), so the bytes written do not depend on the number of workers.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import soundfile as sf

from voxstream.shards.rirsim import simulate_rir
from voxstream.shards.synth import noises
from voxstream.shards.synth.channel import apply_channel, random_channel
from voxstream.shards.synth.voice import FS, random_voice, speak

ROOM_CLASSES = ("smallroom", "mediumroom")
_CODES = {"speaker": 1, "noise": 2, "music": 3, "speech": 4, "room": 5, "trials": 6}
_OURS = ("wav", "musan", "rirs", "trials.txt", "corpus.json")


@dataclass(frozen=True)
class CorpusConfig:
    speakers: int = 50            # training speakers
    test_speakers: int = 20       # held-out speakers, the only ones in trials.txt
    sessions: int = 3             # recording sessions (videos) per speaker, each with its own channel
    utterances: int = 5           # utterances per session
    min_seconds: float = 2.0
    max_seconds: float = 10.0
    noise_clips: int = 20
    music_clips: int = 10
    speech_clips: int = 20        # babble material, from speakers in neither split
    rooms: int = 8                # simulated rooms per size class
    rirs_per_room: int = 4
    seed: int = 0


def speaker_id(index: int) -> str:
    return f"id{index + 1:05d}"


def session_id(index: int) -> str:
    return f"s{index + 1:02d}"


def _rng(cfg: CorpusConfig, kind: str, index: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, _CODES[kind], index])


def _write(path: Path, wave: np.ndarray) -> float:
    """16-bit WAV; a recording that would clip is turned down, as a recorder's limiter would."""
    peak = float(np.abs(wave).max())
    if peak > 0.95:
        wave = wave * (0.95 / peak)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.round(wave * 32767).astype(np.int16), FS, subtype="PCM_16")
    return wave.size / FS


def _duration(cfg: CorpusConfig, rng: np.random.Generator) -> float:
    return round(float(rng.uniform(cfg.min_seconds, cfg.max_seconds)), 2)   # whole 10-ms steps


# ----------------------------------------------------------------------------- jobs (one process each)

def _speaker_job(cfg: CorpusConfig, out: Path, index: int) -> float:
    rng = _rng(cfg, "speaker", index)
    voice, seconds = random_voice(rng), 0.0
    for s in range(cfg.sessions):
        session_voice, channel = voice.drift(rng), random_channel(rng)
        for u in range(cfg.utterances):
            wave = apply_channel(speak(session_voice, _duration(cfg, rng), rng), channel, rng)
            seconds += _write(out / "wav" / speaker_id(index) / session_id(s) / f"{u + 1:05d}.wav", wave)
    return seconds


def _musan_job(cfg: CorpusConfig, out: Path, kind: str, index: int) -> float:
    rng = _rng(cfg, kind, index)
    if kind == "noise":
        wave, _ = noises.noise(rng.uniform(4, 12), rng)
    elif kind == "music":
        wave = noises.music(rng.uniform(8, 16), rng)
    else:   # read speech by a speaker outside both splits, through its own channel
        wave = apply_channel(speak(random_voice(rng), rng.uniform(8, 15), rng), random_channel(rng), rng)
    return _write(out / "musan" / kind / "synth" / f"{kind}-synth-{index:04d}.wav", wave)


def _room_job(cfg: CorpusConfig, out: Path, index: int) -> float:
    room_class, number = ROOM_CLASSES[index % 2], index // 2 + 1
    rng = _rng(cfg, "room", index)
    folder = out / "rirs" / "simulated_rirs" / room_class / f"Room{number:03d}"
    room, seconds = None, 0.0
    for k in range(cfg.rirs_per_room):
        rir, room = simulate_rir(rng, room_class, room)
        seconds += _write(folder / f"Room{number:03d}-{k + 1:05d}.wav", rir)
    return seconds


def _run(job: tuple) -> tuple[float, float]:
    """Run one job; returns (seconds of audio written, CPU seconds spent)."""
    start = time.process_time()
    fn, *args = job
    return fn(*args), time.process_time() - start


# ----------------------------------------------------------------------------- trials

def make_trials(cfg: CorpusConfig) -> list[tuple[int, str, str]]:
    """VoxCeleb-style trials over the test speakers: every target pair (same- and cross-session),
    and as many non-target pairs of different speakers, drawn without repetition."""
    test = range(cfg.speakers, cfg.speakers + cfg.test_speakers)
    utts = {i: [f"{speaker_id(i)}/{session_id(s)}/{u + 1:05d}.wav"
                for s in range(cfg.sessions) for u in range(cfg.utterances)] for i in test}
    if cfg.test_speakers < 2 or cfg.sessions * cfg.utterances < 2:
        raise ValueError("trials need at least 2 test speakers with at least 2 utterances each")
    trials = [(1, a, b) for i in test for a, b in combinations(utts[i], 2)]
    rng, flat = _rng(cfg, "trials", 0), [u for i in test for u in utts[i]]
    speaker_of = np.array([u.split("/")[0] for u in flat])
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < len(trials):
        a, b = rng.integers(0, len(flat), 2)
        if speaker_of[a] != speaker_of[b]:
            pairs.add((min(a, b), max(a, b)))
    trials += [(0, flat[a], flat[b]) for a, b in sorted(pairs)]
    return sorted(trials, key=lambda t: (t[1], t[2]))


# ----------------------------------------------------------------------------- driver

def _prepare(out: Path, overwrite: bool) -> None:
    present = [p for p in out.iterdir()] if out.exists() else []
    if present and not overwrite:
        raise FileExistsError(f"{out} is not empty (overwrite, or --overwrite, replaces a corpus written there)")
    for name in _OURS:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def generate(cfg: CorpusConfig, out: str | Path, workers: int = 1, overwrite: bool = False,
             progress=None) -> dict:
    """Write the corpus of `cfg` under `out`; returns the summary also saved as corpus.json.

    `progress(done, total)` is called after each job when given. With `overwrite`, only the
    corpus' own entries (wav/, musan/, rirs/, trials.txt, corpus.json) are replaced.
    """
    if cfg.speakers < 1 or cfg.sessions < 1 or cfg.utterances < 1:
        raise ValueError("speakers, sessions and utterances must be at least 1")
    if not 0 < cfg.min_seconds <= cfg.max_seconds:
        raise ValueError("need 0 < min_seconds <= max_seconds")
    trials = make_trials(cfg)        # first: it also checks the test split before any audio is made
    out = Path(out)
    _prepare(out, overwrite)
    total = cfg.speakers + cfg.test_speakers
    jobs = ([(_speaker_job, cfg, out, i) for i in range(total)]
            + [(_musan_job, cfg, out, kind, i) for kind, count in
               (("noise", cfg.noise_clips), ("music", cfg.music_clips), ("speech", cfg.speech_clips))
               for i in range(count)]
            + [(_room_job, cfg, out, i) for i in range(2 * cfg.rooms)])
    start, results = time.perf_counter(), []
    with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:   # one worker: no pool
        for result in pool.map(_run, jobs) if pool else map(_run, jobs):
            results.append(result)
            if progress:
                progress(len(results), len(jobs))
    wall = time.perf_counter() - start

    with open(out / "trials.txt", "w") as f:
        f.writelines(f"{label} {a} {b}\n" for label, a, b in trials)
    seconds = np.array([r[0] for r in results])
    speech = float(seconds[:total].sum())
    summary = {
        "config": asdict(cfg),
        "train_speakers": [speaker_id(i) for i in range(cfg.speakers)],
        "test_speakers": [speaker_id(i) for i in range(cfg.speakers, total)],
        "utterances": total * cfg.sessions * cfg.utterances,
        "speech_hours": round(speech / 3600, 4),
        "train_hours": round(float(seconds[:cfg.speakers].sum()) / 3600, 4),
        "musan_seconds": round(float(seconds[total: len(seconds) - 2 * cfg.rooms].sum()), 2),
        "rirs": 2 * cfg.rooms * cfg.rirs_per_room,
        "trials": len(trials),
        "target_trials": sum(t[0] for t in trials),
        "workers": workers,
        "wall_seconds": round(wall, 2),
        "audio_seconds_per_cpu_second": round(float(seconds.sum()) / sum(r[1] for r in results), 1),
        "audio_seconds_per_wall_second_per_worker": round(float(seconds.sum()) / wall / workers, 1),
    }
    tmp = out / "corpus.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, out / "corpus.json")        # last: a corpus.json means a complete corpus
    return summary

