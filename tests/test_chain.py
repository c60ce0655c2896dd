"""tools/chain.py: the chain recipe's checks, and a real chain (SSL -> pseudo-labels -> AAM -> evaluation)
that is stopped in its second stage and resumed where it stopped."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from runs import descendants, tiny_recipe, write_speech_set
from voxstream.model.chain import _step, load_chain, plan
from voxstream.model.recipe import RecipeError
from voxstream.shards.format import iter_samples, shard_urls

ROOT = Path(__file__).resolve().parent.parent


def chain_recipe(tmp_path: Path, shards: str, trials: str) -> Path:
    """Tiny stages: 8 SimCLR steps, 12 k-means clusters merged into 8 pseudo-speakers, 8 AAM steps."""
    ssl = tiny_recipe(tmp_path, shards)
    aam = yaml.safe_load(ssl.read_text())
    aam["method"] = {"name": "aam", "margin_start": 0.0, "margin_end": 0.5}
    (tmp_path / "aam.yaml").write_text(yaml.safe_dump(aam))
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump({
        "common": {"shards": shards, "overrides": ["data.workers=0"], "nproc": 1},
        "first": {"recipe": str(ssl), "epochs": 1},
        "rounds": {"count": 1, "recipe": str(tmp_path / "aam.yaml"), "epochs": 1},
        "labels": {"kmeans": 12, "clusters": 8, "iterations": 5, "workers": 1},
        "evaluate": {"trials": [trials], "shards": shards, "each_stage": True}}))
    return path


@pytest.fixture
def chain(tmp_path):
    shards = str(tmp_path / "speech")
    write_speech_set(shards, speakers=8, sessions=2, utts=3, shards=2)
    keys = sorted(s.key for url in shard_urls(shards) for s in iter_samples(url))
    trials = tmp_path / "trials.txt"  # same speaker: keys of one speaker sort together, 6 apiece
    trials.write_text("".join(f"{int(a.split('/')[1] == b.split('/')[1])} {a} {b}\n"
                              for a, b in zip(keys, keys[1:] + keys[:1])))
    return chain_recipe(tmp_path, shards, str(trials))


def chain_command(recipe: Path, run: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / "chain.py"), "--config", str(recipe), "--out", str(run), *overrides]


def test_chain_recipe_errors_are_one_line(chain, tmp_path):
    assert load_chain(str(chain)).rounds.count == 1
    cases = [(["rounds.cont=2"], r"^rounds.cont: unknown key; valid keys: recipe, overrides, epochs, count, fine_tune$"),
             (["comon.nproc=2"], r"^comon: unknown section; valid sections: common, first, rounds, labels, evaluate$"),
             (["nproc=2"], r"^override 'nproc=2': expected section.key=value, sections: common, first, rounds,"),
             (["common.nproc=two"], r"^common.nproc: expected int, got 'two'$"),
             (["labels.clusters=20"], r"^labels: need kmeans >= 1, 0 <= clusters <= kmeans"),
             (["evaluate.audio_root=wav"], r"^evaluate: give exactly one of audio_root and shards$")]
    for overrides, message in cases:
        with pytest.raises(RecipeError, match=message):
            load_chain(str(chain), overrides)
    # A stage's own recipe is checked before anything runs, and the chain's command says it on one line.
    out = subprocess.run(chain_command(chain, tmp_path / "run", "rounds.overrides=[optim.lr=fast]"),
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"chain: error: rounds.recipe {tmp_path / 'aam.yaml'}: optim.lr: expected float, got 'fast'\n"
    assert not (tmp_path / "run" / "stage0-ssl").exists()


def test_the_demo_chain_and_its_stage_recipes_load(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # its recipe paths are relative to the repository, as in the README's commands
    stages = plan(load_chain(str(ROOT / "configs" / "chain_demo.yaml")), tmp_path)
    assert [s.steps for s in stages] == [150, 75, 75]  # configs/demo.yaml's 300 steps in all
    assert stages[1].overrides[-3:] == [f"data.labels={tmp_path / 'round1' / 'labels.npz'}",
                                        f"train.init={tmp_path / 'stage0-ssl' / 'train' / 'last.pt'}", "method.classes=250"]
    assert stages[2].overrides[-2] == f"train.init={tmp_path / 'round1' / 'train' / 'last.pt'}"  # fine-tunes round 1
    scratch = plan(load_chain(str(ROOT / "configs" / "chain_demo.yaml"), ["rounds.fine_tune=false"]), tmp_path)
    assert not any(o.startswith("train.init=") for s in scratch for o in s.overrides)


def cross_utterance_rounds(chain: Path, tmp_path: Path) -> Path:
    """The chain recipe with cross-utterance SimCLR rounds instead of AAM."""
    tree = yaml.safe_load(chain.read_text())
    tree["rounds"]["recipe"] = str(tmp_path / "tiny.yaml")
    tree["rounds"]["overrides"] = ["data.mode=cross-utterance"]
    path = tmp_path / "chain-cross.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_a_cross_utterance_round_trains_on_the_set_regrouped_by_its_labels(chain, tmp_path):
    run = tmp_path / "run"
    first, round1 = plan(load_chain(str(cross_utterance_rounds(chain, tmp_path))), run)
    assert first.regrouped is None and round1.regrouped == run / "round1" / "shards"
    assert [o for o in round1.overrides if o.startswith("data.train=")][-1] == f"data.train={round1.regrouped}"
    assert not any(o.startswith("data.labels=") for o in round1.overrides)  # the regrouped groups are the labels
    aam_round = plan(load_chain(str(chain)), run)[1]  # AAM takes its classes from data.labels: no regrouping
    assert aam_round.regrouped is None


@pytest.mark.slow
def test_a_chain_with_a_cross_utterance_round_regroups_and_draws_cross_utterance_pairs(chain, tmp_path):
    run = tmp_path / "run"
    out = subprocess.run(chain_command(cross_utterance_rounds(chain, tmp_path), run), cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "== round1: regroup the set by pseudo-speaker" in out.stdout
    regrouped = sorted(s.key for url in shard_urls(str(run / "round1" / "shards")) for s in iter_samples(url))
    original = sorted(s.key for url in shard_urls(str(tmp_path / "speech")) for s in iter_samples(url))
    assert regrouped == original  # every utterance once
    records = [json.loads(line) for line in (run / "round1" / "train" / "metrics.jsonl").read_text().splitlines()]
    pipeline = [r["pipeline"] for r in records if "pipeline" in r]
    assert pipeline and sum(p["cross_items"] for p in pipeline) > 0  # pairs of two utterances of a pseudo-speaker
    assert json.loads((run / "summary.json").read_text())["total_steps"] == 16


@pytest.mark.slow
def test_a_stopped_chain_resumes_at_the_stage_where_it_stopped(chain, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(chain_command(chain, run), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    labels, first = run / "round1" / "labels.npz", run / "stage0-ssl" / "train" / "last.pt"
    deadline = time.monotonic() + 300
    while not labels.exists():  # the first model is trained and has labelled the set: round 1 trains now
        assert proc.poll() is None, f"the chain ended early:\n{proc.communicate()[0][-4000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, log[-4000:]
    assert not descendants(proc.pid)  # the stage it ran was stopped with it
    assert not (run / "round1" / "train" / "last.pt").exists() and not (run / "summary.json").exists()
    done = {p: p.stat().st_mtime_ns for p in (first, labels, run / "stage0-ssl" / "eval" / "metrics.json")}

    out = subprocess.run(chain_command(chain, run), cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert f"== stage0-ssl: train {tmp_path / 'tiny.yaml'} (8 steps): skipped, {first} exists" in out.stdout
    assert f"== round1: pseudo-labels from stage0-ssl: skipped, {labels} exists" in out.stdout
    assert "== round1: train" in out.stdout and "skipped" not in out.stdout.split("== round1: train")[1]
    assert {p: p.stat().st_mtime_ns for p in done} == done  # nothing before round 1's training was redone
    summary = json.loads((run / "summary.json").read_text())
    assert summary["total_steps"] == 16 and [r["stage"] for r in summary["stages"]] == ["stage0-ssl", "round1"]
    first_row, round_row = summary["stages"]
    assert first_row["labels"] is None and round_row["labels"]["clusters"] == 8
    assert 0 <= round_row["labels"]["nmi"] <= 1 and 0 < round_row["labels"]["purity"] <= 1
    assert all(0 <= row["eer"]["trials"] <= 1 for row in summary["stages"])
    assert (run / "eval" / "metrics.json").exists()  # the last model's evaluation
    assert "total training steps: 16" in out.stdout


def test_a_stage_command_is_printed_with_its_secrets_redacted(tmp_path, capfd):
    options = 'data.storage_options={key: AKIA-CHAIN, secret: s3cr3t-chain, client_kwargs: {aws_session_token: t0k3n}}'
    _step("stage", tmp_path / "done", [sys.executable, "-c", "pass", "optim.lr=0.1", options,
                                       "train.storage_options.password=pa55"])
    out = capfd.readouterr().out
    assert "optim.lr=0.1" in out and "data.storage_options=" in out and "<redacted>" in out
    assert not any(secret in out for secret in ("AKIA-CHAIN", "s3cr3t-chain", "t0k3n", "pa55"))
