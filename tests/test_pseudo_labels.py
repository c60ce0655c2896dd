"""Pseudo-labels end to end on real shards: embed (resumable, shared over ranks), cluster, labels file."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from voxstream.model.pseudo_labels import PseudoLabelConfig, cluster_and_write, embed_shards
from voxstream.shards import storage
from voxstream.shards.format import Manifest, build_shard, encode_flac, sample_key, shard_name, write_manifest
from voxstream.shards.labels import LabelIndex, read_labels, write_labels

SR = 16000
SPEAKERS, UTTERANCES, SHARDS = 6, 6, 3


class Spectrum(nn.Module):
    """A fixed embedder: the utterance's mean log power spectrum (enough to tell tones apart)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(x, 512, 160, window=torch.hann_window(512), return_complex=True)
        return torch.log(spec.abs().pow(2).mean(-1) + 1e-6)


def write_set(url: str) -> dict[str, str]:
    """Speakers as harmonic tones of distinct pitch with noise, spread over shards; {key: speaker}."""
    rng = np.random.default_rng(0)
    t = np.arange(SR) / SR
    samples = []
    for s in range(SPEAKERS):
        for u in range(UTTERANCES):
            f0 = 110 * 1.25 ** s * (1 + 0.01 * rng.standard_normal())
            wave = sum(np.sin(2 * np.pi * h * f0 * t) / h for h in range(1, 5)) * 0.2
            wave = wave + 0.02 * rng.standard_normal(SR)
            key = sample_key("tones", f"spk{s}", f"spk{s}-u{u}", f"u{u}")
            meta = {"utt": f"u{u}", "corpus": "tones", "speaker": f"spk{s}", "session": f"spk{s}-u{u}",
                    "group": f"spk{s}-u{u}", "duration": 1.0, "num_samples": SR, "sample_rate": SR, "source": "tone"}
            samples.append((key, meta, encode_flac(wave)))
    order = rng.permutation(len(samples))
    stats = []
    for i in range(SHARDS):
        data, st = build_shard([samples[j] for j in order[i::SHARDS]], shard_name("tones", i))
        storage.write_bytes(storage.join(url, st.name), data)
        stats.append(vars(st))
    write_manifest(url, Manifest(corpus="tones", prefix="tones", shards=stats))
    return {key: meta["speaker"] for key, meta, _ in samples}


@pytest.fixture
def tones(tmp_path):
    url = str(tmp_path / "set")
    return url, write_set(url)


def config(tmp_path, url: str, **kw) -> PseudoLabelConfig:
    return PseudoLabelConfig(shards=url, out=str(tmp_path / "labels.npz"), work=str(tmp_path / "work"),
                             kmeans=12, clusters=SPEAKERS, **kw)


def test_labels_file_round_trip_and_lookup(tmp_path):
    url = str(tmp_path / "labels.npz")
    keys = [f"c/s{i}/x/u{i}" for i in range(50)]
    write_labels(url, keys, np.arange(50) % 7, {"kind": "test"})
    labels = read_labels(url)
    assert labels.info == {"kind": "test"} and list(labels.keys) == sorted(keys)
    index = LabelIndex(labels)
    assert [index.lookup(k) for k in keys] == [i % 7 for i in range(50)]
    assert index.lookup("c/s0/x/not-there") == -1
    with pytest.raises(ValueError, match="unique keys"):
        write_labels(url, ["a", "a"], np.zeros(2), {})
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="bad.npz: not a labels file"):
        read_labels(str(tmp_path / "bad.npz"))
    with pytest.raises(FileNotFoundError, match="missing.npz: labels file not found"):
        read_labels(str(tmp_path / "missing.npz"))


def test_pseudo_labels_recover_the_speakers_and_embedding_resumes(tmp_path, tones):
    url, speaker_of = tones
    cfg = config(tmp_path, url)
    assert embed_shards(Spectrum(), cfg)["embedded"] == SHARDS
    stats = cluster_and_write(cfg)
    assert stats["clusters"] == SPEAKERS and stats["utterances"] == SPEAKERS * UTTERANCES
    assert stats["purity"] >= 0.95 and stats["nmi"] >= 0.95
    labels = read_labels(cfg.out)
    assert sorted(labels.keys) == sorted(speaker_of)  # every utterance labelled, once
    assert labels.info["statistics"] == stats and labels.info["settings"]["kmeans"] == 12
    # A rerun embeds nothing; a lost shard file is the only one redone.
    assert embed_shards(Spectrum(), cfg)["embedded"] == 0
    os.remove(tmp_path / "work" / "emb" / "tones-000001.tar.npz")
    assert embed_shards(Spectrum(), cfg)["embedded"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, cfg: PseudoLabelConfig) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        embed_shards(Spectrum(), cfg)
        cluster_and_write(cfg)
    finally:
        dist.destroy_process_group()


def test_two_ranks_share_the_shards_and_write_the_labels_of_one_process(tmp_path, tones):
    url, _ = tones
    two = config(tmp_path / "two", url)
    mp.spawn(_rank_main, args=(2, _free_port(), two), nprocs=2, join=True)
    assert len(os.listdir(tmp_path / "two" / "work" / "emb")) == SHARDS  # shards 0, 2 on rank 0; 1 on rank 1
    one = config(tmp_path / "one", url)
    embed_shards(Spectrum(), one)
    cluster_and_write(one)
    a, b = read_labels(two.out), read_labels(one.out)
    assert list(a.keys) == list(b.keys)
    assert np.array_equal(a.labels, b.labels)


@pytest.mark.slow
def test_command_line_under_torchrun_labels_every_utterance(tmp_path, tones):
    """tools/pseudo_label.py with a real checkpoint on 2 gloo ranks: one JSON line, a complete labels file."""
    import json
    import subprocess
    import sys
    from dataclasses import asdict
    from pathlib import Path

    from voxstream.model.checkpoint import CHECKPOINT_FORMAT
    from voxstream.model.encoders import EncoderConfig
    from voxstream.model.methods import build_method
    from voxstream.model.methods.simclr import Config as SimCLRConfig

    url, speaker_of = tones
    enc_cfg, method_cfg = EncoderConfig(channels=16, embed_dim=8, n_mels=40), SimCLRConfig()
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "recipe": {"model": asdict(enc_cfg), "method": asdict(method_cfg)},
                "method": build_method(enc_cfg, method_cfg).state_dict(), "step": 1}, ckpt)
    tool = Path(__file__).resolve().parents[1] / "tools" / "pseudo_label.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(tool),
           "--checkpoint", str(ckpt), "--shards", url, "--out", str(tmp_path / "labels.npz"),
           "--work", str(tmp_path / "work"), "--kmeans", "12", "--clusters", "6", "--workers", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["utterances"] == len(speaker_of) and stats["clusters"] == 6 and "nmi" in stats
    assert stats["embedding"]["utt_per_cpu_s"] > 0
    assert sorted(read_labels(str(tmp_path / "labels.npz")).keys) == sorted(speaker_of)
