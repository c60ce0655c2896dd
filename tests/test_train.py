"""Training end to end: real torchrun processes (gloo, CPU) streaming shards from the real S3 server,
checkpoints, exact resume after a kill, SIGTERM, NaN stops, one-line errors."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from runs import (EPOCHS, ROOT, STEPS_PER_EPOCH, TOTAL, descendants, finish, losses, one_line_error, tiny_recipe, torchrun,
                  wait_for, write_banks, write_speech_set)
from voxstream.model.checkpoint import latest_checkpoint, load_method, read_checkpoint, save_checkpoint
from voxstream.model.methods import build_method
from voxstream.model.recipe import RecipeError, TrainConfig, load_recipe, recipe_from_dict
from voxstream.model.preflight import TrainingError, initial_encoder
from voxstream.model.train import train, validate
from voxstream.shards import storage
from voxstream.shards.format import SAMPLE_RATE


@pytest.fixture(scope="module")
def s3_sets(s3_server):
    base = f"s3://{s3_server.bucket}/train-tests"
    write_speech_set(f"{base}/speech")
    noise, rir = write_banks(base)
    return f"{base}/speech", noise, rir


@pytest.fixture(scope="module")
def reference(s3_sets, tmp_path_factory):
    """One uninterrupted 2-rank run (the trajectory the other tests compare against)."""
    folder = tmp_path_factory.mktemp("reference")
    recipe = tiny_recipe(folder, *s3_sets)
    out = finish(torchrun(recipe))
    return folder, recipe, out


@pytest.mark.slow
def test_two_ranks_stream_from_s3_and_the_checkpoint_loads(reference):
    folder, recipe, out = reference
    run = folder / "run"
    assert sorted(losses(run)) == list(range(1, TOTAL + 1))
    ckpt = read_checkpoint(str(run / "last.pt"))
    assert ckpt["step"] == TOTAL and [r["step"] for r in ckpt["ranks"]] == [TOTAL, TOTAL]
    assert [p.name for p in sorted(run.glob("ckpt-*.pt"))] == ["ckpt-00000008.pt", "ckpt-00000016.pt"]
    method, saved = load_method(str(run / "last.pt"))
    assert saved.data.train.startswith("s3://") and saved.train.epochs == EPOCHS
    with torch.no_grad():
        emb = method.embedder()(torch.randn(2, SAMPLE_RATE))
    assert emb.shape == (2, 16) and torch.isfinite(emb).all()
    first, last = np.mean([losses(run)[s] for s in (1, 2, 3)]), np.mean([losses(run)[s] for s in (22, 23, 24)])
    assert last < first, "the loss should come down over 24 steps"


@pytest.mark.slow
def test_killed_and_resumed_run_follows_the_same_trajectory(reference, tmp_path):
    ref_folder, _, _ = reference
    recipe = tiny_recipe(tmp_path, *_sets_of(ref_folder))
    run = tmp_path / "run"
    proc = torchrun(recipe)
    wait_for(lambda: (run / "ckpt-00000008.pt").exists(), proc)
    for pid in [proc.pid, *descendants(proc.pid)]:  # a crash: no SIGTERM, no chance to save
        with contextlib.suppress(ProcessLookupError):  # loader workers exit when their pass ends
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "last.pt").exists(), "the run finished before it could be killed"
    out = finish(torchrun(recipe))  # no flag: a checkpoint in out_dir is resumed automatically
    assert "resuming from" in out
    expected, got = losses(ref_folder / "run"), losses(run)
    assert sorted(got) == list(range(1, TOTAL + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(expected)],
                               rtol=1e-5, atol=1e-6)


def _sets_of(folder: Path) -> tuple[str, str, str]:
    cfg = yaml.safe_load((folder / "tiny.yaml").read_text())
    return cfg["data"]["train"], cfg["augment"]["noise"], cfg["augment"]["rir"]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits(s3_sets, tmp_path):
    recipe = tiny_recipe(tmp_path, *s3_sets)
    run = tmp_path / "run"
    proc = torchrun(recipe, "train.epochs=100", "train.ckpt_every=1000")
    wait_for(lambda: (run / "metrics.jsonl").exists() and len(losses(run)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)  # to torchrun, which forwards it to its workers, as on a preemption
    out, _ = proc.communicate(timeout=60)
    saved = sorted(run.glob("ckpt-*.pt"))
    assert len(saved) == 1 and not (run / "last.pt").exists(), out[-3000:]
    ckpt = read_checkpoint(str(saved[0]))
    assert 3 <= ckpt["step"] < 100 * STEPS_PER_EPOCH
    assert [r["step"] for r in ckpt["ranks"]] == [ckpt["step"]] * 2
    assert f"saved {saved[0]} at step {ckpt['step']}" in out
    assert max(losses(run)) == ckpt["step"]


@pytest.mark.slow
def test_bad_configs_and_unreachable_buckets_give_one_clear_line(s3_sets, tmp_path):
    recipe = tiny_recipe(tmp_path, *s3_sets)
    rc, line = one_line_error(recipe, "optim.lrr=0.1")
    assert rc == 2 and line.startswith("error: optim.lrr: unknown key; valid keys: name, lr,")
    rc, line = one_line_error(recipe, "data.batch_size=four")
    assert rc == 2 and line == "error: data.batch_size: expected int, got 'four'"
    rc, line = one_line_error(recipe, "data.train=s3://no-such-bucket/speech")
    assert rc == 1 and line.startswith("error: data.train:") and "no-such-bucket/speech" in line
    closed = {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    rc, line = one_line_error(recipe, env=closed)
    assert rc == 1 and line.startswith("error: data.train: EndpointConnectionError") and "127.0.0.1:9" in line


@pytest.fixture
def local_sets(tmp_path):
    write_speech_set(str(tmp_path / "speech"), speakers=4)
    return str(tmp_path / "speech")


def test_one_process_run_then_a_diverging_one_stops_without_a_checkpoint(local_sets, tmp_path):
    recipe = tiny_recipe(tmp_path, local_sets)
    run = tmp_path / "run"
    handler = signal.getsignal(signal.SIGTERM)
    assert train(load_recipe(str(recipe), ["train.epochs=1", "data.workers=0"])) == STEPS_PER_EPOCH
    assert signal.getsignal(signal.SIGTERM) is handler, "the run's SIGTERM handler is removed when it ends"
    assert latest_checkpoint(str(run)) == str(run / "last.pt")
    assert "**LEARNED**" in (run / "report.md").read_text() or "**DID NOT LEARN**" in (run / "report.md").read_text()
    assert (run / "report.png").stat().st_size > 0, "a finished run writes its report"
    assert sorted(read_checkpoint(str(run / "last.pt"))) == [  # the layout checkpoint.py documents
        "draw", "format", "method", "optimizer", "ranks", "recipe", "step", "world_size"]
    method, _ = load_method(str(run / "last.pt"))
    assert all(torch.isfinite(p).all() for p in method.parameters())
    # Resumed with a learning rate that blows the weights up: stopped, named, nothing written.
    with pytest.raises(TrainingError) as e:
        train(load_recipe(str(recipe), ["train.epochs=3", "data.workers=0", "optim.lr=1e30", "optim.grad_clip=0"]))
    message = str(e.value)
    bad_step = int(message.split()[1].rstrip(":"))
    assert STEPS_PER_EPOCH < bad_step <= 2 * STEPS_PER_EPOCH and "not finite" in message
    assert message.endswith(f"last good checkpoint: {run / 'last.pt'}")
    assert signal.getsignal(signal.SIGTERM) is handler
    assert sorted(p.name for p in run.glob("*.pt")) == ["last.pt"]
    assert read_checkpoint(str(run / "last.pt"))["step"] == STEPS_PER_EPOCH
    assert max(losses(run)) < bad_step


def test_weights_that_overflow_while_the_loss_is_finite_are_never_checkpointed(local_sets, tmp_path):
    """At lr=1e9 a BatchNorm running_var reaches inf at step 2 while the loss is still finite."""
    recipe = tiny_recipe(tmp_path, local_sets)
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as e:
        train(load_recipe(str(recipe), ["train.epochs=1", "data.workers=0", "optim.lr=1e9", "optim.warmup_epochs=0",
                                        "optim.grad_clip=0", "train.ckpt_every=1"]))
    assert re.fullmatch(rf"step 2: encoder\.\S+\.running_var is not finite; stopped without a checkpoint; "
                        rf"last good checkpoint: {run / 'ckpt-00000001.pt'}", str(e.value)), str(e.value)
    assert sorted(p.name for p in run.glob("*.pt")) == ["ckpt-00000001.pt"]
    assert all(torch.isfinite(t).all() for t in read_checkpoint(str(run / "ckpt-00000001.pt"))["method"].values()
               if t.is_floating_point())


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(local_sets, tmp_path, capfd):
    recipe = tiny_recipe(tmp_path, local_sets)
    run, opts = tmp_path / "run", ["data.workers=0", "train.ckpt_every=4"]
    assert train(load_recipe(str(recipe), ["train.epochs=1", *opts])) == STEPS_PER_EPOCH
    last = run / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a write cut short by preemption
    # Named explicitly, the broken file is an error; found automatically, the previous one resumes.
    with pytest.raises(TrainingError, match=rf"^--resume: CheckpointError: {last}: not a readable checkpoint"):
        train(load_recipe(str(recipe), ["train.epochs=2", *opts]), resume=str(last))
    capfd.readouterr()
    assert train(load_recipe(str(recipe), ["train.epochs=2", *opts])) == 2 * STEPS_PER_EPOCH
    err = capfd.readouterr().err
    assert f"skipping {last}: not a readable checkpoint (" in err
    assert f"resuming from {run / 'ckpt-00000004.pt'} at step 4" in err
    assert read_checkpoint(str(last))["step"] == 2 * STEPS_PER_EPOCH
    # Weights of another size: one line naming the checkpoint and the first tensor that differs.
    with pytest.raises(RecipeError, match=rf"^{last} holds another network than model: size mismatch for encoder"):
        train(load_recipe(str(recipe), ["train.epochs=3", "model.channels=24", *opts]))
    for path in run.glob("*.pt"):
        path.write_bytes(b"")
    oldest = run / "ckpt-00000008.pt"
    with pytest.raises(TrainingError, match=rf"^train.out_dir: no intact checkpoint in {run}, the oldest: {oldest}: "):
        train(load_recipe(str(recipe), ["train.epochs=3", *opts]))


def test_user_mistakes_on_the_command_line_are_one_line_with_exit_code_2(tmp_path):
    recipe = tiny_recipe(tmp_path, str(tmp_path / "speech"))
    for override, line in [("model.name=xyz", "error: model.name: expected one of ecapa, resnet34, got 'xyz'"),
                           ("model.channels=-5", "error: model.channels: must be a positive multiple of 8 "
                                                 "(Res2Net scale), got -5"),
                           ("train.epochs=-1", "error: train.epochs: must be at least 1, got -1")]:
        assert one_line_error(recipe, override) == (2, line)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_checkpoints_keep_the_last_k_and_last_pt_is_the_newest(where, tmp_path, request):
    out = str(tmp_path / "ckpts") if where == "local" else request.getfixturevalue("s3_url") + "/ckpts"
    assert latest_checkpoint(out) is None
    for step in (10, 20, 30, 40):
        save_checkpoint({"step": step, "w": torch.full((3,), float(step))}, out, keep_last=2)
    fs, path = storage.filesystem(out)
    names = lambda: sorted(n.rsplit("/", 1)[-1] for n in fs.ls(path, detail=False, refresh=True)
                           if not n.endswith("/"))
    assert names() == ["ckpt-00000030.pt", "ckpt-00000040.pt"]
    assert latest_checkpoint(out).endswith("ckpt-00000040.pt")
    save_checkpoint({"step": 50}, out, final=True, keep_last=2)
    assert latest_checkpoint(out).endswith("last.pt") and read_checkpoint(latest_checkpoint(out))["step"] == 50
    save_checkpoint({"step": 60}, out, keep_last=2)  # training on past a finished run: last.pt is stale now
    assert names() == ["ckpt-00000040.pt", "ckpt-00000060.pt"]
    assert torch.equal(read_checkpoint(storage.join(out, "ckpt-00000040.pt"))["w"], torch.full((3,), 40.0))


def test_validation_with_a_remote_out_dir_reads_s3_with_its_options_and_leaves_no_folder(s3_server, s3_url,
                                                                                          tmp_path, monkeypatch):
    write_speech_set(f"{s3_url}/speech", speakers=4, sessions=1, utts=2, shards=1)
    ids = [f"spk{s}/s{s}v0/{u:05d}.wav" for s in range(4) for u in range(2)]
    trials = tmp_path / "trials.txt"
    trials.write_text("".join(f"{int(a[:4] == b[:4])} {a} {b}\n" for i, a in enumerate(ids) for b in ids[i + 1:]))
    recipe = recipe_from_dict({"model": {"name": "ecapa", "channels": 16, "embed_dim": 16, "n_mels": 24},
                               "method": {"name": "simclr"}})
    torch.manual_seed(0)
    method = build_method(recipe.model, recipe.method)
    # Only train.storage_options lead to the server: the environment points at a closed port.
    for name in s3_server.env:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    cfg = TrainConfig(out_dir=f"{s3_url}/run", trials=str(trials), trials_audio=f"{s3_url}/speech",
                      storage_options=s3_server.storage_options())
    temp = lambda: set(Path(tempfile.gettempdir()).glob("voxstream-val-*"))
    before = temp()
    result = validate(method, cfg, 10, torch.device("cpu"))
    assert 0 <= result["val_eer"] <= 1 and 0 <= result["val_min_dcf_0.01"] <= 1
    assert temp() == before
    assert method.training, "validation puts the method back in training mode"


def test_augment_cpu_reaches_the_training_batches_and_a_bad_entry_is_a_recipe_error(local_sets, tmp_path,
                                                                                    monkeypatch):
    import voxstream.pipeline.batches as batches

    augmented = []
    original = batches.augment_items
    monkeypatch.setattr(batches, "augment_items", lambda *a: augmented.append(len(a[1])) or original(*a))
    recipe = tiny_recipe(tmp_path, local_sets)
    chain = "augment.cpu=[{name: Gain, min_gain_db: -6, max_gain_db: 6, p: 1.0}]"
    assert train(load_recipe(str(recipe), ["train.epochs=1", "data.workers=0", chain])) == STEPS_PER_EPOCH
    assert len(augmented) == STEPS_PER_EPOCH and set(augmented) == {recipe_batch_size(recipe)}
    with pytest.raises(RecipeError, match=r"^augment.cpu: 'Gian' is not an audiomentations transform"):
        train(load_recipe(str(recipe), ["train.epochs=2", "data.workers=0", "augment.cpu=[{name: Gian}]"]))


def recipe_batch_size(recipe: Path) -> int:
    return yaml.safe_load(recipe.read_text())["data"]["batch_size"]


def test_aam_trains_on_the_metadatas_speakers_and_its_margin_survives_the_checkpoint(local_sets, tmp_path):
    """The supervised baseline through the pseudo-label path: speakers -> labels file -> AAM."""
    from voxstream.model.pseudo_labels import metadata_labels

    labels = str(tmp_path / "speakers.npz")
    assert metadata_labels(local_sets, labels)["clusters"] == 4
    recipe = tiny_recipe(tmp_path, local_sets)
    tree = yaml.safe_load(recipe.read_text())
    tree["method"] = {"name": "aam", "classes": 4, "margin": 0.2, "margin_start": 0.0, "margin_end": 0.5}
    recipe.write_text(yaml.safe_dump(tree))
    with pytest.raises(RecipeError, match="^method.name: aam trains on classes: set data.labels"):
        train(load_recipe(str(recipe), ["data.workers=0"]))
    with pytest.raises(RecipeError, match=r"^method.classes: 3, but .*speakers.npz has labels up to 3"):
        train(load_recipe(str(recipe), ["data.workers=0", f"data.labels={labels}", "method.classes=3"]))
    assert train(load_recipe(str(recipe), ["train.epochs=1", "data.workers=0", f"data.labels={labels}"])) \
        == STEPS_PER_EPOCH
    method, _ = load_method(str(tmp_path / "run" / "last.pt"))
    assert method.margin == 0.2  # the host copy of the schedule, read back from the checkpoint
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 for r in records if "loss" in r)


def test_train_init_starts_the_encoder_from_another_runs_evaluation_network(local_sets, tmp_path):
    """A pseudo-label round fine-tunes: its encoder starts as the previous model's, its heads fresh."""
    from voxstream.model.pseudo_labels import metadata_labels

    recipe = tiny_recipe(tmp_path, local_sets)
    first = ["train.epochs=1", "data.workers=0", f"train.out_dir={tmp_path / 'first'}"]
    train(load_recipe(str(recipe), first))
    source, _ = load_method(str(tmp_path / "first" / "last.pt"))
    labels = str(tmp_path / "speakers.npz")
    metadata_labels(local_sets, labels)
    tree = yaml.safe_load(recipe.read_text())
    tree["method"] = {"name": "aam", "classes": 4}
    recipe.write_text(yaml.safe_dump(tree))
    init = [f"train.init={tmp_path / 'first' / 'last.pt'}", f"data.labels={labels}", "data.workers=0"]
    encoder = initial_encoder(load_recipe(str(recipe), init))
    assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(),
                                                  source.embedder().state_dict().values()))
    with pytest.raises(RecipeError, match="^train.init: .*last.pt holds another network than model"):
        initial_encoder(load_recipe(str(recipe), [*init, "model.channels=24"]))
    assert train(load_recipe(str(recipe), [*init, "train.epochs=1"])) == STEPS_PER_EPOCH


def test_a_secret_in_storage_options_is_never_written_and_the_run_resumes_without_it(s3_server, s3_url, tmp_path):
    from voxstream.shards.locals3 import ACCESS_KEY, SECRET_KEY
    write_speech_set(f"{s3_url}/speech", speakers=4)
    recipe = tiny_recipe(tmp_path, f"{s3_url}/speech")
    # The secret reaches the server only through the recipe's storage options: the environment has no keys.
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    options = json.dumps({"key": ACCESS_KEY, "secret": SECRET_KEY})
    overrides = [f"data.storage_options={options}", f"train.storage_options={options}",
                 f"train.out_dir={s3_url}/run", "train.epochs=1", "data.workers=0"]
    (tmp_path / "tmp").mkdir()  # the runs' temporary files land there, among the files checked
    env["TMPDIR"] = str(tmp_path / "tmp")
    logs = ""
    for epochs in (1, 2):  # the second run resumes from the first one's last.pt
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "--config", str(recipe),
                               *overrides, f"train.epochs={epochs}"], cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs += proc.stdout + proc.stderr
    fs, _ = storage.filesystem(s3_url)
    objects = {path: fs.cat_file(path) for path in fs.find(s3_url)}
    ckpt = read_checkpoint(f"{s3_url}/run/last.pt")
    assert ckpt["step"] == 2 * STEPS_PER_EPOCH, "the second run resumed with its own options"
    assert ckpt["recipe"]["data"]["storage_options"] == {"key": storage.REDACTED, "secret": storage.REDACTED}
    method, _ = load_method(f"{s3_url}/run/last.pt")  # a checkpoint without its secrets still loads
    local = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(path.endswith("metrics.jsonl") for path in objects) and local
    written = {**objects, **{str(p): p.read_bytes() for p in local}, "stdout and stderr": logs.encode()}
    assert [where for where, data in written.items() if SECRET_KEY.encode() in data] == []
