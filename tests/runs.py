"""The training tests' kit: tiny speech and noise shard sets, a tiny recipe, real torchrun processes and
what to read back from a run (its losses, its one-line error)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml

from voices import utterances, voices
from voxstream.pipeline.banks import write_clip_set
from voxstream.shards import storage
from voxstream.shards.format import SAMPLE_RATE, Manifest, build_shard, encode_flac, sample_key, shard_name, write_manifest

ROOT = Path(__file__).resolve().parent.parent
STEPS_PER_EPOCH, EPOCHS = 8, 3
TOTAL = STEPS_PER_EPOCH * EPOCHS


def write_speech_set(url: str, speakers: int = 8, sessions: int = 2, utts: int = 3, shards: int = 2) -> None:
    """A complete shard set (manifest last) of speech-like utterances, sessions contiguous."""
    g, speaker_voices = torch.Generator().manual_seed(0), voices(speakers, seed=0)
    samples = []
    for s in range(speakers):
        for v in range(sessions):
            for u in range(utts):
                wave = 0.5 * utterances(speaker_voices[s:s + 1], 2.0, g)[0].numpy()
                spk, session, utt = f"spk{s}", f"s{s}v{v}", f"{u:05d}"
                meta = {"utt": utt, "corpus": "synth", "speaker": spk, "session": session, "group": session,
                        "duration": len(wave) / SAMPLE_RATE, "num_samples": len(wave),
                        "sample_rate": SAMPLE_RATE, "source": f"{spk}/{session}/{utt}.wav"}
                samples.append((sample_key("synth", spk, session, utt), meta, encode_flac(wave)))
    per = len(samples) // shards
    stats = []
    for i in range(shards):
        data, st = build_shard(samples[i * per:(i + 1) * per], shard_name("train", i))
        storage.write_bytes(storage.join(url, st.name), data)
        stats.append(asdict(st))
    write_manifest(url, Manifest(corpus="synth", prefix="train", shards=stats))


def write_banks(url: str) -> tuple[str, str]:
    rng = np.random.default_rng(1)
    noise = [(kind, (0.1 * rng.standard_normal(3 * SAMPLE_RATE)).astype(np.float32))
             for kind in ("noise", "music", "speech", "speech", "speech")]
    decay = np.exp(-np.arange(SAMPLE_RATE // 4) / 800.0)
    rirs = [("rir", (decay * rng.standard_normal(len(decay))).astype(np.float32)) for _ in range(3)]
    write_clip_set(f"{url}/musan", "musan", noise)
    write_clip_set(f"{url}/rirs", "rirs", rirs)
    return f"{url}/musan", f"{url}/rirs"


def tiny_recipe(folder: Path, data: str, noise: str = "", rir: str = "") -> Path:
    """A few-second-per-epoch recipe: tiny ECAPA, SimCLR, 2 x 1 s views, batch 4 per rank."""
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"train": data, "batch_size": 4, "views": [1.0, 1.0], "workers": 1, "shuffle_buffer": 16,
                 "steps_per_epoch": STEPS_PER_EPOCH, "min_duration": 1.0, "seed": 3},
        "augment": {"noise": noise, "rir": rir, "segment_seconds": 1.0, "rir_seconds": 0.25},
        "model": {"name": "ecapa", "channels": 16, "embed_dim": 16, "n_mels": 24},
        "method": {"name": "simclr", "projector_hidden_dim": 32, "projector_output_dim": 16},
        "optim": {"name": "sgd", "lr": 0.05, "final_lr": 0.001, "warmup_epochs": 0.5, "grad_clip": 5.0},
        "train": {"out_dir": str(folder / "run"), "epochs": EPOCHS, "log_every": 1, "ckpt_every": 8,
                  "keep_last": 2, "seed": 5}}))
    return path


def torchrun(recipe: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tools" / "train.py"), "--config", str(recipe), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def losses(out_dir: Path) -> dict[int, float]:
    lines = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def descendants(pid: int) -> list[int]:
    """Every process below pid (torchrun starts its workers in their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def wait_for(condition, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"training ended early:\n{proc.communicate()[0][-4000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def one_line_error(recipe: Path, *overrides: str, env: dict | None = None) -> tuple[int, str]:
    """Plain-python run that must fail: (exit code, its last stderr line); no traceback allowed."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "--config", str(recipe), *overrides],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stderr.strip().splitlines()[-1]

