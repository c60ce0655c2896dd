"""Pseudo-labels end to end on real shards: embed (resumable, shared over ranks), cluster, labels file."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from ranks import run_ranks
from voices import SR, utterances, voices
from voxstream.model.pseudo_labels import PseudoLabelConfig, cluster_and_write, embed_shards
from voxstream.shards import storage
from voxstream.shards.format import Manifest, Sample, build_shard, encode_flac, sample_key, shard_name, write_manifest
from voxstream.shards.labels import read_labels, write_labels

SPEAKERS, UTTERANCES, SHARDS = 6, 6, 3


class Spectrum(nn.Module):
    """A fixed embedder: the utterance's mean log power spectrum less its mean (gain-free), which
    tells the test voices apart by their pitch and harmonic envelope."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(x, 512, 160, window=torch.hann_window(512), return_complex=True)
        log_power = torch.log(spec.abs().pow(2).mean(-1) + 1e-6)
        return log_power - log_power.mean(-1, keepdim=True)


def write_set(url: str) -> dict[str, str]:
    """The test voices' utterances, spread over shards in a shuffled order; {key: speaker}."""
    g = torch.Generator().manual_seed(0)
    speakers = voices(SPEAKERS, seed=0)
    samples = []
    for u in range(UTTERANCES):
        for s, wave in enumerate(utterances(speakers, 1.0, g).numpy()):
            key = sample_key("voices", f"spk{s}", f"spk{s}-u{u}", f"u{u}")
            meta = {"utt": f"u{u}", "corpus": "voices", "speaker": f"spk{s}", "session": f"spk{s}-u{u}",
                    "group": f"spk{s}-u{u}", "duration": 1.0, "num_samples": SR, "sample_rate": SR, "source": "voice"}
            samples.append(Sample(key, meta, encode_flac(wave / 1.2)))
    order = np.random.default_rng(0).permutation(len(samples))
    stats = []
    for i in range(SHARDS):
        data, st = build_shard([samples[j] for j in order[i::SHARDS]], shard_name("voices", i))
        storage.write_bytes(storage.join(url, st.name), data)
        stats.append(vars(st))
    write_manifest(url, Manifest(corpus="voices", prefix="voices", shards=stats))
    return {s.key: s.meta["speaker"] for s in samples}


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
    labels = read_labels(url, keys=True)
    assert labels.info == {"kind": "test"} and sorted(labels.keys) == sorted(keys)
    assert [labels.lookup(k) for k in keys] == [i % 7 for i in range(50)]
    assert labels.lookup("c/s0/x/not-there") == -1
    assert read_labels(url).keys is None  # the loader's read leaves the key strings in the file
    with pytest.raises(ValueError, match="repeated keys"):
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
    # What SSPS would draw from the 12 k-means clusters (two a speaker): mostly the speaker's other half,
    # never the anchor's own group, which here is its utterance.
    assert stats["ssps_same_speaker"] >= 0.75 and stats["ssps_same_group"] == 0.0
    labels = read_labels(cfg.out, keys=True)
    assert sorted(labels.keys) == sorted(speaker_of)  # every utterance labelled, once
    assert labels.info["statistics"] == stats and labels.info["settings"]["kmeans"] == 12
    # A rerun embeds nothing; a lost shard file is the only one redone.
    assert embed_shards(Spectrum(), cfg)["embedded"] == 0
    os.remove(tmp_path / "work" / "emb" / "voices-000001.tar.npz")
    assert embed_shards(Spectrum(), cfg)["embedded"] == 1


def _label_on_a_rank(rank: int, world: int, cfg: PseudoLabelConfig) -> None:
    embed_shards(Spectrum(), cfg)
    cluster_and_write(cfg)


def test_two_ranks_share_the_shards_and_write_the_labels_of_one_process(tmp_path, tones):
    url, _ = tones
    two = config(tmp_path / "two", url)
    run_ranks(_label_on_a_rank, two)
    assert len(os.listdir(tmp_path / "two" / "work" / "emb")) == SHARDS  # shards 0, 2 on rank 0; 1 on rank 1
    one = config(tmp_path / "one", url)
    embed_shards(Spectrum(), one)
    cluster_and_write(one)
    a, b = read_labels(two.out, keys=True), read_labels(one.out, keys=True)
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
    assert sorted(read_labels(str(tmp_path / "labels.npz"), keys=True).keys) == sorted(speaker_of)
