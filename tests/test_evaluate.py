"""Evaluation: trial parsing, audio sources (folder, local and S3 shards), the embedding cache, the
written outputs and the command line. The scoring arithmetic is in test_scoring.py."""
from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from voices import SR, utterances, voices
from voxstream.model import metrics
from voxstream.model.checkpoint import CHECKPOINT_FORMAT
from voxstream.model.embeddings import EmbedOptions, EmbeddingCache, ShardAudio, extract, model_fingerprint, trial_suffix
from voxstream.model.evaluate import EvalConfig, Trials, by_session, evaluate, read_trials
from voxstream.shards.format import Manifest, build_shard, encode_flac, sample_key, shard_name, write_manifest
from voxstream.shards import storage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import evaluate as evaluate_tool  # noqa: E402


class SpectralEmbedder(nn.Module):
    """A tiny fixed network: mean log-spectrum of 25 ms frames, randomly projected. Counts its calls."""

    def __init__(self, dim: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(201, dim)
        self.calls = 0

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        frames = wave.unfold(1, 400, 160)
        spectrum = torch.fft.rfft(frames, dim=-1).abs().add(1e-3).log()
        return self.proj(spectrum.mean(dim=1) - spectrum.mean(dim=(1, 2), keepdim=True).squeeze(-1))


# ---------------------------------------------------------------- metrics

# ---------------------------------------------------------------- trials and ids

def test_malformed_trial_line_stops_with_its_line_number(tmp_path, capsys):
    path = tmp_path / "trials.txt"
    path.write_text("1 a/x/1.wav a/y/2.wav\n0 a/x/1.wav b/z/3.wav\n1 a/x/1.wav\n")
    with pytest.raises(ValueError, match=r"trials.txt:3: expected 'label enroll test'"):
        read_trials(str(path))
    path.write_text("1 a/x/1.wav a/y/2.wav\n\nyes a/x/1.wav b/z/3.wav\n")
    with pytest.raises(ValueError, match=r"trials.txt:3:.*label 0 or 1"):
        read_trials(str(path))
    # The command line: one line on stderr and a non-zero exit, before any model is loaded.
    rc = evaluate_tool.main(["--checkpoint", str(tmp_path / "none.pt"), "--trials", str(path),
                             "--audio-root", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "trials.txt:3:" in err[0]


def test_trial_ids_map_to_shard_keys():
    assert trial_suffix("id10270/5r0dWxy17C8/00001.wav") == "id10270/5r0dWxy17C8/00001"
    key = sample_key("voxceleb1", "id10270", "a.b c", "00001")
    assert trial_suffix("id10270/a.b c/00001.wav") == "/".join(key.split("/")[-3:])
    with pytest.raises(ValueError, match="speaker/session/utt"):
        trial_suffix("00001.wav")


# ---------------------------------------------------------------- end to end on synthetic speakers

def _corpus(root: Path, speakers: int = 4, sessions: int = 2, utts: int = 2) -> dict[str, np.ndarray]:
    """Synthetic voices (tests/voices.py), 1 to 2 s an utterance, written as 16-bit WAV."""
    g, waves = torch.Generator().manual_seed(0), {}
    for s, voice in enumerate(voices(speakers, seed=0)):
        for sess in range(sessions):
            for u in range(utts):
                seconds = 1 + torch.rand((), generator=g).item()
                wave = 0.5 * utterances(voice[None], seconds, g)[0].numpy()  # peak about 0.5: no clipping
                ident = f"id{s:05d}/sess{sess}/{u:05d}.wav"
                path = root / ident
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(path, wave, SR, subtype="PCM_16")
                waves[ident], _ = sf.read(path, dtype="float32")
    return waves


def _write_trials(path: Path, ids: list[str]) -> Path:
    lines = [f"{int(a.split('/')[0] == b.split('/')[0])} {a} {b}" for i, a in enumerate(ids) for b in ids[i + 1:]]
    path.write_text("\n".join(lines) + "\n")
    return path


def _shards(url: str, waves: dict[str, np.ndarray], per_shard: int = 5) -> None:
    """The corpus as a shard set (keys voxtest/<spk>/<session>/<utt>), in shuffled order."""
    samples = []
    for ident in sorted(waves, key=lambda i: zlib.crc32(i.encode())):
        spk, sess, utt = ident[:-4].split("/")
        key = sample_key("voxtest", spk, sess, utt)
        meta = {"utt": utt, "corpus": "voxtest", "speaker": spk, "session": sess, "group": f"{spk}/{sess}",
                "duration": len(waves[ident]) / SR, "num_samples": len(waves[ident]), "sample_rate": SR,
                "source": ident}
        samples.append((key, meta, encode_flac(waves[ident])))
    manifest = Manifest(corpus="voxtest", prefix="voxtest")
    for k in range(0, len(samples), per_shard):
        data, stats = build_shard(samples[k:k + per_shard], shard_name("voxtest", k // per_shard))
        storage.write_bytes(storage.join(url, stats.name), data)
        manifest.shards.append(vars(stats))
    write_manifest(url, manifest)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    waves = _corpus(root)
    ids = sorted(waves)
    trials = _write_trials(root.parent / "all.txt", ids)
    _shards(str(root.parent / "shards"), waves)
    return root, waves, ids, trials


def test_session_breakdown_separates_same_and_cross_session_targets():
    # Same-session targets outscore every non-target, cross-session ones score below them all: the
    # breakdown shows the channel shortcut that the pooled EER (50%) hides.
    rows = [(1, "a/s1/1", "a/s1/2", 0.9), (1, "a/s1/1", "a/s2/1", 0.3), (1, "b/s1/1", "b/s1/2", 0.8),
            (1, "b/s1/1", "b/s2/1", 0.2), (0, "a/s1/1", "b/s1/1", 0.4), (0, "a/s2/1", "b/s2/1", 0.5)]
    labels, enroll, test, scores = (list(c) for c in zip(*rows))
    prefixed = lambda ids: [f"wav/{i}" for i in ids]  # ids below a further folder
    for e, t in ((enroll, test), (prefixed(enroll), prefixed(test))):
        got = by_session(Trials("t", "t.txt", np.array(labels, np.int8), e, t), np.array(scores))
        assert got == {"same_session": {"targets": 2, "eer": 0.0}, "cross_session": {"targets": 2, "eer": 1.0}}
    flat = Trials("t", "t.txt", np.array(labels, np.int8), [i.replace("/", "-") for i in enroll], test)
    assert by_session(flat, np.array(scores)) is None            # ids without speaker/session/utterance
    cross_only = Trials("t", "t.txt", np.array(labels[1::2] + [0], np.int8), enroll[1::2] + ["a/s1/1"],
                        test[1::2] + ["b/s1/1"])
    assert by_session(cross_only, np.array(scores[1::2] + [0.4])) is None   # one kind only: nothing to add


def test_the_baseline_and_the_evaluator_read_one_trial_list_alike(corpus, tmp_path):
    from voxstream.model.baseline import score_trials

    root, _, ids, _ = corpus
    lines = _write_trials(tmp_path / "t.txt", ids[:6]).read_text().splitlines()
    path = tmp_path / "blank.txt"
    path.write_text("\n".join(lines[:4] + ["", "  "] + lines[4:]) + "\n\n")
    t = read_trials(str(path))
    scores, labels, _ = score_trials(path, root)
    assert len(t.labels) == len(scores) == len(lines) and labels.tolist() == t.labels.tolist()
    path.write_text("\n".join(lines[:4] + ["", "1 only-one-id"]) + "\n")
    for read in (read_trials, lambda p: score_trials(p, root)):
        with pytest.raises(ValueError, match=r"blank.txt:6: expected 'label enroll test'"):
            read(str(path))


def _expected_scores(embedder: nn.Module, waves: dict, trials_path: Path, step: int = 1600) -> np.ndarray:
    """Each utterance embedded alone (floored to the length step), then cosine: no batching at all."""
    t = read_trials(str(trials_path))
    with torch.no_grad():
        emb = {i: embedder(torch.from_numpy(w[:len(w) // step * step])[None]).numpy()[0] for i, w in waves.items()}
    unit = {i: v / np.linalg.norm(v) for i, v in emb.items()}
    return np.array([unit[e] @ unit[u] for e, u in zip(t.enroll, t.test)])


def _read_scores(path: Path) -> tuple[np.ndarray, list[tuple[str, str]]]:
    rows = [line.split() for line in path.read_text().splitlines()]
    return np.array([float(r[0]) for r in rows]), [(r[1], r[2]) for r in rows]


def test_folder_evaluation_writes_outputs_and_reuses_the_cache(corpus, tmp_path):
    root, waves, ids, trials = corpus
    embedder = SpectralEmbedder()
    cfg = EvalConfig(trials=[str(trials)], audio_root=str(root), out=str(tmp_path / "out"),
                     embed=EmbedOptions(batch_size=4, workers=2))
    report = evaluate(embedder, cfg)
    assert embedder.calls >= len(ids) / 4

    out = tmp_path / "out"
    t = read_trials(str(trials))
    scores, pairs = _read_scores(out / "scores-all.txt")
    assert pairs == list(zip(t.enroll, t.test))
    # Batching by length changes nothing: the job's scores equal one-utterance-at-a-time embeddings.
    np.testing.assert_allclose(scores, _expected_scores(embedder, waves, trials), atol=2e-5)
    saved = json.loads((out / "metrics.json").read_text())
    row = saved["lists"]["all"]["scoring"]["cosine"]
    assert row["eer"] == pytest.approx(metrics.eer(scores, t.labels), abs=1e-5)
    assert row["min_dcf_0.01"] == pytest.approx(metrics.min_dcf(scores, t.labels, 0.01), abs=1e-5)
    assert row["min_dcf_0.05"] == pytest.approx(metrics.min_dcf(scores, t.labels, 0.05), abs=1e-5)
    assert saved["lists"]["all"]["trials"] == len(t.labels) and saved == json.loads(json.dumps(report))
    assert saved["lists"]["all"]["speakers"]["speakers"] == 4
    sessions, expected = saved["lists"]["all"]["sessions"], by_session(t, scores)
    assert sessions.keys() == expected.keys() == {"same_session", "cross_session"}
    for kind in expected:
        assert sessions[kind]["targets"] == expected[kind]["targets"] > 0
        assert sessions[kind]["eer"] == pytest.approx(expected[kind]["eer"], abs=1e-5)
    assert saved["embedding"]["computed"] == len(ids) and saved["embedding"]["utterances_per_second"] > 0
    for png in ("det.png", "hist-all.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    # Second run, plus a second list over the same utterances: nothing is recomputed.
    subset = tmp_path / "subset.txt"
    subset.write_text("".join(trials.read_text().splitlines(keepends=True)[::3]))
    cfg.trials = [str(trials), str(subset)]
    calls = embedder.calls
    again = evaluate(embedder, cfg)
    assert embedder.calls == calls
    assert again["embedding"]["cached"] == len(ids) and again["embedding"]["computed"] == 0
    assert again["lists"]["all"]["scoring"] == report["lists"]["all"]["scoring"]
    # Other weights never reuse the cache.
    other = SpectralEmbedder()
    with torch.no_grad():
        other.proj.weight.mul_(2)
    cache_of = lambda m: EmbeddingCache(out / "cache", model_fingerprint(m), cfg.embed, f"trials:{root}").path
    assert cache_of(embedder).exists() and cache_of(other) != cache_of(embedder)


def test_missing_audio_stops_with_the_first_missing_ids(corpus, tmp_path):
    root, waves, ids, trials = corpus
    extra = tmp_path / "extra.txt"
    extra.write_text(f"1 {ids[0]} id00000/nope/00009.wav\n0 id00042/x/00001.wav {ids[1]}\n"
                     f"0 {ids[0]} id00042/x/00002.wav\n")
    cfg = EvalConfig(trials=[str(extra)], audio_root=str(root), out=str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="3 trial utterance.*first: id00000/nope/00009.wav, "
                                                "id00042/x/00001.wav, id00042/x/00002.wav"):
        evaluate(SpectralEmbedder(), cfg)
    cfg.audio_root, cfg.shards = "", str(root.parent / "shards")
    with pytest.raises(FileNotFoundError, match="3 trial utterance.*not in the shards.*first: id00000/nope"):
        evaluate(SpectralEmbedder(), cfg)
    # A file that is not audio stops with its path.
    bad = tmp_path / "audio" / "id00009" / "s" / "00001.wav"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"RIFF garbage")
    extra.write_text("1 id00009/s/00001.wav id00009/s/00001.wav\n0 id00009/s/00001.wav id00009/s/00001.wav\n")
    cfg.audio_root, cfg.shards = str(tmp_path / "audio"), ""
    with pytest.raises(ValueError, match=r"id00009/s/00001.wav: cannot decode audio"):
        evaluate(SpectralEmbedder(), cfg)


def test_shard_source_with_cohort_and_mean_matches_folder(corpus, tmp_path):
    root, waves, ids, trials = corpus
    shards = str(root.parent / "shards")
    embedder = SpectralEmbedder()
    # A tiny buffer forces early, partial batches on the shards' unsorted stream: results must not change.
    cfg = EvalConfig(trials=[str(trials)], shards=shards, cohort=shards, mean_from=shards, top_n=5,
                     out=str(tmp_path / "out"), embed=EmbedOptions(batch_size=4, workers=2, buffer_seconds=3.0))
    report = evaluate(embedder, cfg)
    scores, _ = _read_scores(tmp_path / "out" / "scores-all.txt")

    t = read_trials(str(trials))
    expected_cosine = _expected_scores(embedder, waves, trials)
    assert set(report["lists"]["all"]["scoring"]) == {"cosine", "as-norm"}
    # The scores file holds AS-norm scores; its metrics are those of the file.
    assert report["lists"]["all"]["scoring"]["as-norm"]["eer"] == pytest.approx(metrics.eer(scores, t.labels), abs=1e-5)
    assert not np.allclose(scores, expected_cosine, atol=1e-3)
    # The cohort and the mean come from the whole shard set (16 samples < set_utts), embedded once.
    cache = EmbeddingCache(tmp_path / "out" / "cache", model_fingerprint(embedder), cfg.embed, f"set:{shards}")
    assert len(cache) == len(ids)


def test_shards_on_s3_and_crops(corpus, tmp_path, s3_url):
    root, waves, ids, trials = corpus
    _shards(s3_url, waves, per_shard=7)
    embedder = SpectralEmbedder()
    opts = EmbedOptions(crops=3, crop_seconds=1.5, batch_size=6, workers=2)
    audio = ShardAudio(s3_url, lambda key: key)
    got = dict(pair for ids_, z in extract(embedder, audio, opts, "cpu") for pair in zip(ids_, z))
    assert len(got) == len(ids) and not audio.failed
    # Crop embeddings: 3 evenly spaced 1.5 s crops (a shorter utterance repeats itself), unit-norm, averaged.
    size = int(1.5 * SR)
    for ident, wave in waves.items():
        wave = np.resize(wave, max(size, len(wave)))
        starts = np.linspace(0, len(wave) - size, 3).round().astype(int)
        with torch.no_grad():
            z = embedder(torch.from_numpy(np.stack([wave[s:s + size] for s in starts])))
        expected = nn.functional.normalize(z, dim=1).mean(dim=0).numpy()
        np.testing.assert_allclose(got[sample_key("voxtest", *ident[:-4].split("/"))], expected, atol=1e-5)


def test_unreadable_shard_is_reported(corpus, tmp_path):
    root, waves, ids, trials = corpus
    shards = tmp_path / "shards"
    _shards(str(shards), waves)
    (shards / shard_name("voxtest", 1)).write_bytes(b"not a tar file" * 100)
    cfg = EvalConfig(trials=[str(trials)], shards=str(shards), out=str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match=r"5 trial utterance.*\(1 shard\(s\) unreadable\)"):
        evaluate(SpectralEmbedder(), cfg)


def test_command_line_rejects_bad_input(corpus, tmp_path, capsys):
    root, waves, ids, trials = corpus
    with pytest.raises(SystemExit):
        evaluate_tool.main(["--untrained", "--trials", str(trials), "--audio-root", str(root)])
    assert "--untrained with --config" in capsys.readouterr().err
    rc = evaluate_tool.main(["--checkpoint", str(tmp_path / "missing.pt"), "--trials", str(trials),
                             "--audio-root", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "nowhere" in err[0]


def test_command_line_evaluates_a_checkpoint_and_its_untrained_encoder(corpus, tmp_path, capsys):
    """The real path: a checkpoint (small ECAPA, SimCLR) through tools/evaluate.py, then --untrained."""
    from dataclasses import asdict

    from voxstream.model.encoders import EncoderConfig
    from voxstream.model.methods import build_method
    from voxstream.model.recipe import method_config

    root, waves, ids, _ = corpus
    trials = _write_trials(tmp_path / "small.txt", ids[::2])   # 8 utterances, 4 speakers: keeps ECAPA quick
    waves = {i: waves[i] for i in ids[::2]}
    enc_cfg, method_cfg = EncoderConfig(channels=32, embed_dim=16, n_mels=40), method_config({"name": "simclr"})
    torch.manual_seed(0)
    method = build_method(enc_cfg, method_cfg)
    with torch.no_grad():   # "trained": weights that differ from any initialisation
        for p in method.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "recipe": {"model": asdict(enc_cfg), "method": asdict(method_cfg)},
                "method": method.state_dict(), "step": 1}, ckpt)
    common = ["--trials", str(trials), "--audio-root", str(root), "--batch-size", "8", "--workers", "1"]
    assert evaluate_tool.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "trained"), *common]) == 0
    assert evaluate_tool.main(["--checkpoint", str(ckpt), "--untrained", "--out", str(tmp_path / "init"),
                               *common]) == 0
    assert "trial list" in capsys.readouterr().out
    trained = json.loads((tmp_path / "trained" / "metrics.json").read_text())
    init = json.loads((tmp_path / "init" / "metrics.json").read_text())
    assert trained["model"] == str(ckpt) and init["model"].startswith("untrained simclr ecapa")
    assert trained["fingerprint"] == model_fingerprint(method.embedder())[:16] != init["fingerprint"]
    scores, _ = _read_scores(tmp_path / "trained" / "scores-small.txt")
    np.testing.assert_allclose(scores, _expected_scores(method.embedder().eval(), waves, trials), atol=1e-4)


def test_a_checkpoint_whose_recipe_no_longer_validates_is_one_line_naming_it(corpus, tmp_path, capsys):
    root, _, _, trials = corpus
    ckpt = tmp_path / "old.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "step": 1, "method": {},
                "recipe": {"model": {"name": "ecapa", "chanels": 32}, "method": {"name": "simclr"}}}, ckpt)
    for untrained in ([], ["--untrained"]):
        rc = evaluate_tool.main(["--checkpoint", str(ckpt), *untrained, "--trials", str(trials),
                                 "--audio-root", str(root)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, err
        assert f"{ckpt}: the checkpoint's recipe does not validate: model.chanels: unknown key" in err[0]


def test_a_file_that_is_not_a_checkpoint_or_holds_another_network_is_one_line(corpus, tmp_path, capsys):
    from dataclasses import asdict

    from voxstream.model.encoders import EncoderConfig
    from voxstream.model.methods import build_method
    from voxstream.model.recipe import method_config

    root, _, _, trials = corpus
    small, method_cfg = EncoderConfig(channels=16, embed_dim=8, n_mels=40), method_config({"name": "simclr"})
    recipe = {"model": {**asdict(small), "channels": 32}, "method": asdict(method_cfg)}  # says 32, holds 16
    mismatched, text, cut = tmp_path / "mismatched.pt", tmp_path / "notes.pt", tmp_path / "cut.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "step": 1, "recipe": recipe,
                "method": build_method(small, method_cfg).state_dict()}, mismatched)
    text.write_text("not a checkpoint\n")
    cut.write_bytes(mismatched.read_bytes()[:1000])
    for ckpt, message in [(text, f"{text}: not a readable checkpoint (UnpicklingError: "),
                          (cut, f"{cut}: not a readable checkpoint (RuntimeError: "),
                          (mismatched, f"{mismatched} holds another network than model: size mismatch for encoder.")]:
        rc = evaluate_tool.main(["--checkpoint", str(ckpt), "--trials", str(trials), "--audio-root", str(root)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith(f"evaluate: error: {message}"), err


def test_self_trials_and_repeated_lines_are_counted_in_a_warning(tmp_path, caplog):
    path = tmp_path / "trials.txt"
    path.write_text("1 a/x/1.wav a/y/2.wav\n0 a/x/1.wav b/z/3.wav\n")
    read_trials(str(path))
    assert not caplog.records
    path.write_text("1 a/x/1.wav a/y/2.wav\n0 a/x/1.wav b/z/3.wav\n1 a/x/1.wav a/x/1.wav\n"
                    "1 a/x/1.wav a/y/2.wav\n0 a/x/1.wav b/z/3.wav\n1 b/z/3.wav b/z/3.wav\n")
    t = read_trials(str(path))
    assert len(t.labels) == 6  # scored as given
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: 2 self-trial(s) (enroll == test) and 2 repeated trial line(s) among 6, scored as given"]


def test_untrained_encoder_from_a_recipe_is_reproducible(tmp_path):
    from voxstream.model.evaluate import load_embedder

    config = tmp_path / "recipe.yaml"
    config.write_text("model: {name: ecapa, channels: 16, embed_dim: 8, n_mels: 40}\nmethod: {name: simclr}\n")
    a, name = load_embedder(config=str(config), untrained=True, seed=0)
    b, _ = load_embedder(config=str(config), untrained=True, seed=0)
    c, _ = load_embedder(config=str(config), untrained=True, seed=1)
    assert name.startswith("untrained simclr ecapa") and a.embed_dim == 8
    assert model_fingerprint(a) == model_fingerprint(b) != model_fingerprint(c)
    config.write_text("model: {name: ecapa, chanels: 16}\nmethod: {name: simclr}\n")
    with pytest.raises(ValueError, match="model.chanels"):
        load_embedder(config=str(config), untrained=True)
