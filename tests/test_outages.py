"""Storage outages against a real S3 server: one of the test's own, stopped and restarted on its ports
while training streams from it or make_shards writes to it; an endpoint down from the start; a
mistyped bucket in train.out_dir.

botocore tries each request once (storage._s3_defaults), so voxstream's own retries (storage.Retry,
given small backoffs here through the recipe keys and flags) are what must ride an outage out.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from runs import STEPS_PER_EPOCH, losses, one_line_error, tiny_recipe, write_speech_set
from test_make_shards import LIBRI, corpus, samples
from voxstream.model.recipe import RecipeError, TrainConfig, load_recipe
from voxstream.model.preflight import check_outputs
from voxstream.shards import format as fmt
from voxstream.shards import storage
from voxstream.shards.locals3 import local_s3

ROOT = Path(__file__).resolve().parent.parent
CLOSED = {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}


@pytest.fixture
def own_s3(monkeypatch):
    """A server this test may stop and restart (never the session's shared one)."""
    with local_s3(bucket="outage") as server:
        for k, v in server.env.items():
            monkeypatch.setenv(k, v)
        yield server


def outage(server, seconds: float) -> None:
    server.stop()
    time.sleep(seconds)
    server.start()


@pytest.mark.slow
def test_training_rides_out_a_server_restart_with_the_retries_logged_and_counted(own_s3, tmp_path):
    data = f"s3://{own_s3.bucket}/speech"
    write_speech_set(data)
    recipe = tiny_recipe(tmp_path, data)
    cfg = yaml.safe_load(recipe.read_text())
    cfg["data"].update(retry_attempts=8, retry_backoff=0.2)
    cfg["train"]["epochs"] = 6
    recipe.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "train.py"), "--config", str(recipe)], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not ((run / "metrics.jsonl").exists() and len(losses(run)) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-4000:]
        time.sleep(0.05)
    outage(own_s3, 8.0)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    assert sorted(losses(run)) == list(range(1, 6 * STEPS_PER_EPOCH + 1))
    assert "Could not connect to the endpoint URL" in out and "retrying in" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    pipeline = [r["pipeline"] for r in records if "pipeline" in r]
    assert len(pipeline) == 6 and sum(p["retries"] for p in pipeline) >= 1, pipeline


def make_shards(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), *map(str, argv)], cwd=ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300)


def assert_one_line(proc: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1, proc.stderr[-4000:]
    assert lines[0].startswith("make_shards.py: error: ") and all(f in lines[0] for f in fragments), lines[0]


@pytest.mark.slow
def test_sharding_stopped_by_an_outage_says_one_line_then_resume_gives_every_utterance_once(own_s3, tmp_path):
    inputs = corpus(tmp_path / "src", speakers=80)
    out = f"s3://{own_s3.bucket}/set"
    args = ["folder", "--root", tmp_path / "src", "--pattern", LIBRI, "--out", out, "--shard-size", "100k",
            "--retry-attempts", "2", "--retry-backoff", "0.1"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "make_shards.py"), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fs, path = storage.filesystem(out)
    while len(fs.glob(f"{path}/*.tar")) < 3:
        assert proc.poll() is None, proc.communicate()
        fs.invalidate_cache()  # s3fs caches listings
        time.sleep(0.05)
    own_s3.stop()
    _, err = proc.communicate(timeout=300)
    *retries, last = err.strip().splitlines()  # the retry logged, then the one line of the error
    assert proc.returncode == 1 and retries and all("retrying in" in line for line in retries), err[-4000:]
    assert last.startswith("make_shards.py: error: write s3://outage/set/") and "gave up after 2 attempts" in last
    assert "Could not connect to the endpoint URL" in last and last.endswith("rerun with --resume to continue")
    own_s3.start()
    assert not storage.exists(f"{out}/{fmt.MANIFEST}")
    done = make_shards(*args, "--resume")
    assert done.returncode == 0, done.stderr[-4000:]
    fs.invalidate_cache()
    keys = [s.key for s in samples(out)]
    assert len(keys) == len(set(keys)) == len(inputs)
    assert make_shards("verify", out).returncode == 0


@pytest.mark.slow
def test_an_endpoint_down_from_the_start_is_one_line(tmp_path, s3_server):
    corpus(tmp_path / "src", speakers=1)
    url = f"s3://{s3_server.bucket}/never"
    assert_one_line(make_shards("folder", "--root", tmp_path / "src", "--out", url, env=CLOSED), 1,
                    "127.0.0.1:9", "--resume")
    assert_one_line(make_shards("verify", url, env=CLOSED), 1, "127.0.0.1:9")


def test_a_missing_out_dir_bucket_is_an_error_unless_its_creation_is_asked_for(s3_server, tmp_path):
    speech = tmp_path / "speech"
    write_speech_set(str(speech), speakers=2, shards=1)
    recipe = tiny_recipe(tmp_path, str(speech))
    rc, line = one_line_error(recipe, "train.out_dir=s3://no-such-bucket-typo/run")
    assert rc == 2 and line == ("error: train.out_dir: bucket no-such-bucket-typo does not exist in "
                                "s3://no-such-bucket-typo/run; create it, or set train.create_bucket=true")
    assert not storage.exists("s3://no-such-bucket-typo")
    asked = load_recipe(recipe, ["train.out_dir=s3://fresh-bucket/run", "train.create_bucket=true"])
    check_outputs(asked)
    assert storage.exists("s3://fresh-bucket")
    with pytest.raises(RecipeError, match="bucket no-such-bucket-typo does not exist"):
        check_outputs(load_recipe(recipe, ["train.out_dir=s3://no-such-bucket-typo/run"]))
    assert TrainConfig().create_bucket is False
