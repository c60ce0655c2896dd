"""SSPS in the trainer (model/ssps.py through model/train.py): sampling switches on at the configured
step with its monitors in metrics.jsonl, a run resumed mid-epoch follows the same trajectory, and the
settings that cannot work are one line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from runs import STEPS_PER_EPOCH, TOTAL, losses, tiny_recipe, write_speech_set
from voxstream.model.checkpoint import read_checkpoint
from voxstream.model.recipe import RecipeError, load_recipe
from voxstream.model.ssps import sampling_step, SSPSConfig
from voxstream.model.train import train

# 24 steps of 8 an epoch: sampling from the first epoch boundary at or after half of them (step 16),
# the queues filling from one epoch before (step 8).
SSPS = ["ssps.enabled=true", "ssps.start=0.5", "ssps.clusters=6", "ssps.queue_size=24", "ssps.ref_seconds=1.5",
        "data.workers=0", "train.ckpt_every=4", "train.keep_last=6"]
START = 16


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("ssps") / "speech")
    write_speech_set(url, speakers=6)
    return url


@pytest.fixture(scope="module")
def uninterrupted(speech, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("uninterrupted")
    assert train(load_recipe(str(tiny_recipe(folder, speech)), SSPS)) == TOTAL
    return folder


def records(run: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if "loss" in r}


def test_sampling_switches_on_at_the_configured_step_with_its_monitors(uninterrupted):
    assert sampling_step(SSPSConfig(start=0.5), STEPS_PER_EPOCH, TOTAL) == START
    logged = records(uninterrupted / "run")
    assert sorted(logged) == list(range(1, TOTAL + 1))
    for step, r in logged.items():  # a record's step counts steps done: step 17 is the first to sample
        if step <= START:
            assert r["ssps_sampled"] == 0 and r["ssps_clusters"] == 0, step
        else:
            assert r["ssps_sampled"] > 0 and r["ssps_clusters"] == 6, step
            assert 0 <= r["ssps_same_group"] <= 1 and 0 <= r["ssps_same_speaker"] <= 1
    assert np.mean([r["ssps_sampled"] for step, r in logged.items() if step > START]) > 0.5
    state = read_checkpoint(str(uninterrupted / "run" / "last.pt"))["ssps"]
    assert len(state["filled"]) == 6 * 2 * 3 + 1  # a row for each utterance of the set, and the spare
    assert state["filled"][:-1].sum() > 6 * 2 * 3 // 2  # 64 draws with replacement since step 8
    assert state["anchors"] == (TOTAL - START) * 4 and 0 < state["found"] <= state["anchors"]


def test_a_run_resumed_mid_epoch_with_ssps_follows_the_same_trajectory(speech, uninterrupted, tmp_path):
    """Resuming at step 20 (half-way through the first sampling epoch) needs the queues, centroids and
    counters from the checkpoint: fresh ones would sample nothing until the next epoch boundary."""
    recipe = tiny_recipe(tmp_path, speech)
    (tmp_path / "run").mkdir()
    shutil.copy(uninterrupted / "run" / "ckpt-00000020.pt", tmp_path / "run")
    assert train(load_recipe(str(recipe), SSPS)) == TOTAL
    expected, got = losses(uninterrupted / "run"), losses(tmp_path / "run")
    assert sorted(got) == list(range(21, TOTAL + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)], rtol=1e-5, atol=1e-6)
    assert [records(tmp_path / "run")[s]["ssps_sampled"] for s in sorted(got)] == \
        [records(uninterrupted / "run")[s]["ssps_sampled"] for s in sorted(got)]


def test_ssps_continues_a_run_trained_without_it(speech, tmp_path, capsys):
    """sslsv's recipe: SimCLR first, then SSPS from that checkpoint. The plain run's checkpoint has no
    SSPS state; the queues start empty there, fill for an epoch and sampling starts on schedule."""
    plain = tmp_path / "plain"
    plain.mkdir()
    plain_recipe = tiny_recipe(plain, speech)
    assert train(load_recipe(str(plain_recipe), ["data.workers=0", "train.ckpt_every=4", "train.keep_last=6",
                                                 "train.epochs=1"])) == STEPS_PER_EPOCH
    assert "ssps" not in read_checkpoint(str(plain / "run" / "last.pt"))
    recipe = tiny_recipe(tmp_path, speech)
    assert train(load_recipe(str(recipe), SSPS), resume=str(plain / "run" / "last.pt")) == TOTAL
    assert "no SSPS state (trained without ssps); SSPS starts with empty queues, filled from step 8, and samples " \
           "from the first epoch boundary after that, at or after step 16" in capsys.readouterr().err
    logged = records(tmp_path / "run")
    assert sorted(logged) == list(range(STEPS_PER_EPOCH + 1, TOTAL + 1))
    assert all(logged[step]["ssps_sampled"] == 0 for step in range(STEPS_PER_EPOCH + 1, START + 1))
    assert np.mean([logged[step]["ssps_sampled"] for step in range(START + 1, TOTAL + 1)]) > 0.5
    assert read_checkpoint(str(tmp_path / "run" / "last.pt"))["ssps"]["anchors"] == (TOTAL - START) * 4


def test_ssps_with_a_method_without_a_positive_branch_or_without_a_manifest_is_one_line(speech, tmp_path):
    recipe = str(tiny_recipe(tmp_path, speech))
    with pytest.raises(RecipeError, match="^ssps.enabled: vicreg has no positive branch to sample; SSPS works with "
                                          "simclr, moco, dino$"):
        train(load_recipe(recipe, [*SSPS, "method.name=vicreg", "method.projector_hidden_dim=32",
                                   "method.projector_output_dim=16"]))
    pattern = f"{speech}/train-{{000000..000001}}.tar"  # the same shards, named without their manifest
    with pytest.raises(RecipeError, match="^ssps.enabled: data.train must be shard sets with a manifest"):
        train(load_recipe(recipe, [*SSPS, f"data.train={pattern}"]))


@pytest.mark.parametrize("method, views", [
    ({"name": "moco", "queue_size": 64, "projector_hidden_dim": 32, "projector_output_dim": 16}, [1.0, 1.0]),
    ({"name": "dino", "out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}, [1.0, 1.0, 0.5])], ids=["moco", "dino"])
def test_moco_and_dino_take_sampled_positives_through_their_positive_branch(speech, tmp_path, method, views):
    """MoCo's keys and DINO's teacher embeddings are what the positive queue holds and swaps."""
    recipe = tiny_recipe(tmp_path, speech)
    tree = yaml.safe_load(recipe.read_text())
    tree["method"], tree["data"]["views"] = method, views
    recipe.write_text(yaml.safe_dump(tree))
    assert train(load_recipe(str(recipe), SSPS)) == TOTAL
    logged = records(tmp_path / "run")
    assert all(np.isfinite(r["loss"]) for r in logged.values())
    sampled = [r["ssps_sampled"] for step, r in logged.items() if step > START]
    assert min(sampled) > 0 and np.mean(sampled) > 0.5
    queue = read_checkpoint(str(tmp_path / "run" / "last.pt"))["ssps"]["queue"]
    assert queue.shape == (24, 2, 16)  # two positive outputs an item (keys of both views, or both global crops), 16-d
