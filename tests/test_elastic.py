"""Resuming on another number of ranks: the global batch kept, the step count continued, the method
state carried, the epoch's remaining steps streamed from fresh draws. Real torchrun processes (gloo, CPU)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from runs import STEPS_PER_EPOCH, descendants, finish, losses, tiny_recipe, wait_for, write_speech_set
from voxstream.model.checkpoint import read_checkpoint
from voxstream.model.preflight import rescale_batch
from voxstream.model.recipe import load_recipe
from voxstream.model.train import train
from voxstream.pipeline.loader import make_loader

ROOT = Path(__file__).resolve().parent.parent
QUEUE = 200  # MoCo keys: 2 views x the global batch of 8 a step, so the pointer tells how many were queued


def moco_recipe(folder: Path, data: str) -> Path:
    recipe = tiny_recipe(folder, data)
    tree = yaml.safe_load(recipe.read_text())
    tree["method"] = {"name": "moco", "queue_size": QUEUE, "projector_hidden_dim": 32, "projector_output_dim": 16}
    tree["data"]["workers"] = 0
    tree["train"].update(epochs=2, ckpt_every=4)
    recipe.write_text(yaml.safe_dump(tree))
    return recipe


def run(recipe: Path, ranks: int, *overrides: str) -> str:
    """tools/train.py on `ranks` processes (torchrun when more than one); its output."""
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    proc = subprocess.run([sys.executable, *launch, str(ROOT / "tools" / "train.py"), "--config", str(recipe),
                           *overrides], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stderr


@pytest.fixture
def speech(tmp_path):
    write_speech_set(str(tmp_path / "speech"), speakers=4)
    return str(tmp_path / "speech")


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_run_resumed_on_another_number_of_ranks_keeps_its_global_batch_and_method_state(speech, tmp_path,
                                                                                           before, after):
    folder = tmp_path / f"{before}to{after}"
    folder.mkdir()
    recipe, out = moco_recipe(folder, speech), folder / "run"
    per_rank = {1: 8, 2: 4}
    run(recipe, before, "train.epochs=1", f"data.batch_size={per_rank[before]}")
    (out / "last.pt").unlink()  # resume mid-epoch, from ckpt-4
    saved = read_checkpoint(str(out / "ckpt-00000004.pt"))
    assert saved["world_size"] == before and saved["method"]["queue_ptr"] == 4 * 2 * 8

    err = run(recipe, after, f"data.batch_size={per_rank[before]}")  # the recipe as first given
    assert (f"resuming on {after} rank(s) from {before}: global batch 8 kept, {per_rank[after]} per rank; "
            f"the epoch's remaining steps stream fresh draws") in err
    last = read_checkpoint(str(out / "last.pt"))
    assert last["step"] == 2 * STEPS_PER_EPOCH and last["world_size"] == after
    assert last["recipe"]["data"]["batch_size"] == per_rank[after] and len(last["ranks"]) == after
    assert sorted(losses(out)) == list(range(1, 2 * STEPS_PER_EPOCH + 1))  # each step once, none lost
    # The queue went on from the checkpoint's: 12 more steps of 16 keys each, and the rows they did not
    # reach still hold the keys the first run queued.
    ptr = (4 + 12) * 16 % QUEUE
    assert last["method"]["queue_ptr"] == ptr
    untouched = slice(ptr, 4 * 16)
    assert torch.equal(last["method"]["queue"][untouched], saved["method"]["queue"][untouched])
    assert torch.equal(last["method"]["queue_groups"][untouched], saved["method"]["queue_groups"][untouched])
    # The fresh draws of epoch 0 are recorded, so a plain resume in that epoch replays them; epoch 1 is the
    # stream of a run started on `after` ranks.
    assert read_checkpoint(str(out / "ckpt-00000008.pt"))["draw"] == 4
    assert read_checkpoint(str(out / "ckpt-00000012.pt"))["draw"] == 0


def test_a_global_batch_the_new_ranks_cannot_share_keeps_the_per_rank_batch_and_says_so(speech, tmp_path, capsys):
    recipe = load_recipe(str(tiny_recipe(tmp_path, speech)), ["data.batch_size=3"])
    ckpt = {"world_size": 1, "step": 8, "recipe": {"data": {"batch_size": 3}}}
    assert rescale_batch(recipe, ckpt, 2).data.batch_size == 3
    line = capsys.readouterr().err
    assert line == ("resuming on 2 rank(s) from 1: global batch 3 does not divide by 2, so it becomes 6 (3 per "
                    "rank): the learning rate is not rescaled, and the in-batch negatives and batch statistics "
                    "change with it\n")
    assert rescale_batch(recipe, {**ckpt, "world_size": 4, "step": 9}, 2).data.batch_size == 6


def test_a_draw_seeds_the_epochs_streams_afresh(speech, tmp_path):
    data = load_recipe(str(tiny_recipe(tmp_path, speech)), ["data.workers=0"]).data
    keys = lambda draw: [b.keys for b in make_loader(data, 0, 0, 1, start_step=4, draw=draw)]
    plain, drawn = keys(0), keys(4)
    assert len(drawn) == STEPS_PER_EPOCH - 4 and drawn == keys(4)
    assert drawn != plain and plain == [b.keys for b in make_loader(data, 0, 0, 1)][4:]


@pytest.mark.slow
def test_a_rank_killed_mid_run_makes_torchrun_restart_the_group_from_the_newest_checkpoint(speech, tmp_path):
    recipe, out = moco_recipe(tmp_path, speech), tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           str(ROOT / "tools" / "train.py"), "--config", str(recipe), "train.epochs=6"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for(lambda: (out / "ckpt-00000004.pt").exists(), proc)
    rank1 = next(pid for pid in descendants(proc.pid) if "LOCAL_RANK=1" in environ(pid))
    os.kill(rank1, signal.SIGKILL)  # a crash: no chance to save
    log = finish(proc, timeout=180)
    resumed = [int(m) for m in re.findall(r"resuming from \S+ at step (\d+)", log)]
    assert len(resumed) == 1 and resumed[0] >= 4, log[-3000:]
    last = read_checkpoint(str(out / "last.pt"))
    assert last["step"] == 6 * STEPS_PER_EPOCH and resumed[0] < last["step"]
    assert sorted(losses(out)) == list(range(1, 6 * STEPS_PER_EPOCH + 1))  # every step once, none lost


def environ(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").replace("\0", " ")
    except OSError:
        return ""
