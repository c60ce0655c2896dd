"""Using a trained model: the Python API (embed, score, verify), tools/embed.py (Kaldi ark/scp, resumable),
tools/verify.py, the TorchScript and ONNX exports, and the run report."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import kaldiio
import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from voices import SR, utterances, voices
from voxstream.model import monitors
from voxstream.model.checkpoint import CHECKPOINT_FORMAT
from voxstream.model.embedder import Embedder
from voxstream.model.embeddings import EmbedOptions, extract
from voxstream.model.encoders import EncoderConfig
from voxstream.model.export import load_runner
from voxstream.model.methods import build_method
from voxstream.model.recipe import method_config
from voxstream.model.report import write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import embed as embed_tool  # noqa: E402
import evaluate as evaluate_tool  # noqa: E402
import export as export_tool  # noqa: E402
import verify as verify_tool  # noqa: E402

ENCODER = EncoderConfig(channels=32, embed_dim=16, n_mels=40)


def _checkpoint(path: Path, method_name: str) -> torch.nn.Module:
    """A small ECAPA checkpoint as the trainer lays it out, its weights moved off any initialisation."""
    torch.manual_seed(0)
    cfg = method_config({"name": method_name, **({"out_dim": 256} if method_name == "dino" else {})})
    method = build_method(ENCODER, cfg)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save({"format": CHECKPOINT_FORMAT, "recipe": {"model": asdict(ENCODER), "method": asdict(cfg)},
                "method": method.state_dict(), "step": 1}, path)
    return method


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two utterances of each of 3 synthetic voices, 1-2.5 s, as 16-bit WAV."""
    root = tmp_path_factory.mktemp("wav")
    g = torch.Generator().manual_seed(1)
    for s, voice in enumerate(voices(3, seed=1)):
        for u in range(2):
            wave = 0.5 * utterances(voice[None], 1.0 + 1.5 * torch.rand((), generator=g).item(), g)[0].numpy()
            path = root / f"id{s:05d}" / "sess0" / f"{u:05d}.wav"   # the VoxCeleb layout
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, wave, SR, subtype="PCM_16")
    return root, sorted(str(p.relative_to(root)) for p in root.rglob("*.wav"))


@pytest.fixture(scope="module")
def simclr(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "simclr.pt"
    return path, _checkpoint(path, "simclr")


# ---------------------------------------------------------------- the Python API

def test_api_embeddings_are_those_of_the_evaluator(corpus, simclr, tmp_path):
    root, ids = corpus
    ckpt, _ = simclr
    trials = tmp_path / "trials.txt"
    trials.write_text("".join(f"{int(a.split('/')[0] == b.split('/')[0])} {a} {b}\n"
                              for i, a in enumerate(ids) for b in ids[i + 1:]))
    assert evaluate_tool.main(["--checkpoint", str(ckpt), "--trials", str(trials), "--audio-root", str(root),
                               "--out", str(tmp_path / "eval"), "--workers", "1"]) == 0
    with np.load(next((tmp_path / "eval" / "cache").glob("emb-*.npz"))) as cached:
        evaluator = dict(zip(cached["ids"].tolist(), cached["emb"]))
    model = Embedder.load(str(ckpt), "cpu", metrics=str(tmp_path / "eval" / "metrics.json"))
    batch = model.embed([root / i for i in ids])
    for k, ident in enumerate(ids):
        np.testing.assert_allclose(model.embed(str(root / ident)), evaluator[ident], atol=1e-5)
        np.testing.assert_allclose(batch[k], evaluator[ident], atol=1e-5)   # a batch changes nothing
    # The threshold is the evaluation's cosine EER point, and scores are the evaluator's cosine scores.
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert model.threshold == report["lists"]["trials"]["scoring"]["cosine"]["eer_threshold"]
    first = (tmp_path / "eval" / "scores-trials.txt").read_text().split("\n")[0].split()
    assert model.score(evaluator[first[1]], evaluator[first[2]]) == pytest.approx(float(first[0]), abs=1e-5)


def test_a_dino_checkpoint_embeds_with_its_teacher(corpus, tmp_path):
    root, ids = corpus
    method = _checkpoint(tmp_path / "dino.pt", "dino")
    with torch.no_grad():   # a student that has moved away from its teacher
        for p in method.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save({**torch.load(tmp_path / "dino.pt", weights_only=False), "method": method.state_dict()},
               tmp_path / "dino.pt")
    wave = sf.read(root / ids[0], dtype="float32")[0]
    got = Embedder.load(str(tmp_path / "dino.pt"), "cpu").embed(wave, sample_rate=SR)
    opts = EmbedOptions(workers=1)
    teacher = next(extract(method.teacher_encoder.eval(), [("x", wave)], opts, "cpu"))[1][0]
    student = next(extract(method.encoder.eval(), [("x", wave)], opts, "cpu"))[1][0]
    np.testing.assert_allclose(got, teacher, atol=1e-5)
    assert np.abs(got - student).max() > 1e-3


def test_stereo_and_44k_audio_embed_like_their_mono_16k_version(corpus, simclr, tmp_path):
    root, ids = corpus
    model = Embedder.load(str(simclr[0]), "cpu")
    mono = sf.read(root / ids[0], dtype="float32")[0]
    reference = model.embed(mono, sample_rate=SR)
    # 44.1 kHz stereo whose channels average to the mono signal, each channel far from it.
    hi = AF.resample(torch.from_numpy(mono), SR, 44100)
    side = 0.3 * torch.randn(hi.shape, generator=torch.Generator().manual_seed(0))
    stereo = torch.stack([hi + side, hi - side])
    sf.write(tmp_path / "stereo.wav", stereo.T.numpy(), 44100, subtype="FLOAT")
    for got in (model.embed(str(tmp_path / "stereo.wav")), model.embed(stereo, sample_rate=44100)):
        assert model.score(got, reference) > 0.999
    # Without the mixing and the resampling the embedding is another one: the check above can fail.
    assert model.score(model.embed(stereo[0].numpy(), sample_rate=SR), reference) < 0.99
    other = model.embed(str(root / ids[-1]))
    assert model.score(other, reference) < 0.999
    with pytest.raises(ValueError, match=r"\[channels, samples\].*transpose"):
        model.embed(stereo.T.numpy(), sample_rate=44100)
    with pytest.raises(ValueError, match="sample_rate"):
        model.embed(mono)


# ---------------------------------------------------------------- tools/verify.py

def test_verify_decides_by_the_threshold(corpus, simclr, tmp_path, capsys):
    root, ids = corpus
    ckpt = str(simclr[0])
    a, b = str(root / ids[0]), str(root / ids[1])
    assert verify_tool.main([a, b, "--checkpoint", ckpt]) == 0
    score = float(capsys.readouterr().out.split()[1])
    assert verify_tool.main([a, b, "--checkpoint", ckpt, "--threshold", f"{score - 1e-3}"]) == 0
    assert "same speaker" in capsys.readouterr().out
    assert verify_tool.main([a, b, "--checkpoint", ckpt, "--threshold", f"{score + 1e-3}"]) == 1
    assert "different speakers" in capsys.readouterr().out
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"lists": {"o": {"scoring": {"cosine": {"eer_threshold": score + 1e-3}}}}}))
    assert verify_tool.main([a, b, "--checkpoint", ckpt, "--metrics", str(metrics)]) == 1
    metrics.write_text(json.dumps({"lists": {"o": {"scoring": {"cosine": {"eer": 0.1}}}}}))
    assert verify_tool.main([a, b, "--checkpoint", ckpt, "--metrics", str(metrics)]) == 2
    assert "no eer_threshold" in capsys.readouterr().err


# ---------------------------------------------------------------- tools/embed.py

def _scp(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines()]


def test_embed_writes_kaldi_ark_scp_and_resumes_after_a_kill(corpus, simclr, tmp_path):
    root, ids = corpus
    ckpt = str(simclr[0])
    many = tmp_path / "many"   # 36 files: enough for a kill to land mid-run
    for k in range(6):
        for ident in ids:
            dest = many / f"copy{k}" / ident
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes((root / ident).read_bytes())
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "tools" / "embed.py"), "--checkpoint", ckpt, "--out", str(out),
           "--audio-root", str(many), "--part-size", "2", "--batch-size", "2", "--workers", "1", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((out / "parts").glob("part-*.scp")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "embeddings.scp").exists(), "the run finished before it was killed"
    kept = sum(len(_scp(p)) for p in (out / "parts").glob("part-*.scp"))
    assert 0 < kept < 36
    # A torn part: its ark written, its scp not yet. The rerun must rewrite it, not list it.
    numbers = [int(p.stem.split("-")[1]) for p in (out / "parts").glob("part-*.scp")]
    (out / "parts" / f"part-{max(numbers) + 1:05d}.ark").write_bytes(b"torn")
    assert embed_tool.main(cmd[2:]) == 0
    keys = _scp(out / "embeddings.scp")
    expected = sorted(f"copy{k}/{i[:-4]}" for k in range(6) for i in ids)
    assert keys == expected   # every key once, sorted
    assert sum(len(_scp(p)) for p in (out / "parts").glob("part-*.scp")) == 36, "a key embedded twice"
    model = Embedder.load(ckpt, "cpu")
    for key, vector in kaldiio.load_scp_sequential(str(out / "embeddings.scp")):
        np.testing.assert_allclose(vector, model.embed(str(many / f"{key}.wav")), atol=1e-5)
    # A second run with nothing left to do recomputes nothing and lists the same keys.
    before = sorted(p.name for p in (out / "parts").iterdir())
    assert embed_tool.main(cmd[2:]) == 0 and _scp(out / "embeddings.scp") == expected
    assert sorted(p.name for p in (out / "parts").iterdir()) == before


def test_embed_reads_a_wav_scp_list_and_rejects_bad_keys(corpus, simclr, tmp_path, capsys):
    root, ids = corpus
    listing = tmp_path / "wav.scp"
    listing.write_text("".join(f"utt{k} {root / i}\n" for k, i in enumerate(ids[:3])))
    args = ["--checkpoint", str(simclr[0]), "--list", str(listing), "--workers", "1"]
    assert embed_tool.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert _scp(tmp_path / "a" / "embeddings.scp") == ["utt0", "utt1", "utt2"]
    listing.write_text(f"utt0 {root / ids[0]}\nutt0 {root / ids[1]}\n")
    assert embed_tool.main([*args, "--out", str(tmp_path / "b")]) == 2
    assert "wav.scp:2: key utt0 listed twice" in capsys.readouterr().err


def test_embed_reads_every_sample_of_a_shard_set_on_s3(corpus, simclr, tmp_path, s3_url):
    root, ids = corpus
    shards = f"{s3_url}/speech"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "voxceleb", "--root", str(root),
                    "--out", shards, "--workers", "1", "--min-duration", "0.5"], check=True)
    assert embed_tool.main(["--checkpoint", str(simclr[0]), "--shards", shards, "--out", str(tmp_path / "e"),
                            "--workers", "1"]) == 0
    got = dict(kaldiio.load_scp_sequential(str(tmp_path / "e" / "embeddings.scp")))
    assert sorted(got) == sorted(f"voxceleb/{i[:-4]}" for i in ids)
    model = Embedder.load(str(simclr[0]), "cpu")   # FLAC in the shards is lossless: the files' embeddings
    for ident in ids:
        np.testing.assert_allclose(got[f"voxceleb/{ident[:-4]}"], model.embed(str(root / ident)), atol=1e-5)


# ---------------------------------------------------------------- export

def test_torchscript_and_onnx_exports_match_eager(simclr, tmp_path, capsys):
    ckpt, method = simclr
    assert export_tool.main(["--checkpoint", str(ckpt), "--out", str(tmp_path)]) == 0
    assert "max |export - eager|" in capsys.readouterr().out
    network = method.embedder().eval()
    g = torch.Generator().manual_seed(2)
    for name in ("embedder.torchscript.pt", "embedder.onnx"):
        run = load_runner(str(tmp_path / name))
        for seconds, batch in ((0.73, 1), (1.37, 2), (4.21, 3)):   # none the traced 3 s length
            wave = 0.5 * utterances(voices(batch, seed=3), seconds, g)
            with torch.no_grad():
                eager = network(wave).numpy()
            np.testing.assert_allclose(run(wave.numpy()), eager, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- the run report

def _run_folder(folder: Path, embeddings: torch.Tensor, steps: int = 40) -> Path:
    """A run folder whose metrics.jsonl logs these embeddings' monitors at each step, the loss falling."""
    folder.mkdir()
    _checkpoint(folder / "last.pt", "simclr")
    std, rank = monitors.embedding_std(embeddings).item(), monitors.effective_rank(embeddings).item()
    with open(folder / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            f.write(json.dumps({"step": step, "epoch": 0, "lr": 1e-3, "loss": 4.0 - 2.0 * step / steps,
                                "embedding_std": std, "effective_rank": rank, "utt_per_s": 50.0,
                                "data_wait": 0.01}) + "\n")
        f.write(json.dumps({"step": steps, "epoch": 0, "pipeline": {"samples_read": 10}}) + "\n")
    return folder


def test_the_report_names_a_collapsed_run_and_a_learning_one(tmp_path):
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(64, ENCODER.embed_dim, generator=g)
    constant = spread[:1].repeat(64, 1) + 1e-6 * torch.randn(64, ENCODER.embed_dim, generator=g)
    healthy = _run_folder(tmp_path / "healthy", spread)
    collapsed = _run_folder(tmp_path / "collapsed", constant)
    assert write_report(str(healthy))[0] == "learned"
    state, url = write_report(str(collapsed))
    text = Path(url).read_text()
    assert state == "collapsed" and "**COLLAPSED**" in text and "constant" in text
    assert (collapsed / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "embed_dim: 16" in text   # the recipe, from the checkpoint
    # An evaluation in the run folder is found and tabled with its EER.
    (healthy / "eval").mkdir()
    (healthy / "eval" / "metrics.json").write_text(json.dumps({"lists": {"vox1-o": {
        "trials": 10, "scoring": {"cosine": {"eer": 0.0345, "min_dcf_0.01": 0.3, "eer_threshold": 0.41}}}}}))
    assert write_report(str(healthy))[0] == "learned"
    assert "| vox1-o | cosine | 10 | 3.45 | 0.3000 | 0.4100 |" in (healthy / "report.md").read_text()
