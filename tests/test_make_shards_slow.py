"""Slow sharding runs with real worker processes: a SIGKILLed run resumed, and workers-independence."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from voxstream.shards import writer
from test_make_shards import LIBRI, corpus, files_of, run

TOOL = Path(__file__).parents[1] / "tools" / "make_shards.py"


def _finished_shards(out: Path) -> int:
    try:
        return len(json.loads((out / writer.PROGRESS).read_text())["shards"])
    except (FileNotFoundError, ValueError):
        return 0


@pytest.mark.slow
def test_killed_parallel_run_resumes_to_the_uninterrupted_result(tmp_path):
    root = tmp_path / "src"
    corpus(root, speakers=12, sessions=4, utts=4)
    args = ["folder", "--root", root, "--pattern", LIBRI, "--shard-size", "100k", "--seed", "5"]
    assert run(*args, "--out", tmp_path / "clean") == 0  # in-process, one worker
    clean = files_of(tmp_path / "clean")

    killed = tmp_path / "killed"
    cmd = [sys.executable, TOOL, *args, "--out", killed, "--workers", "2"]
    proc = subprocess.Popen([str(c) for c in cmd], start_new_session=True, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while _finished_shards(killed) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the tool and its encoding workers, mid-run
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "manifest.json").exists()

    assert run(*args, "--out", killed, "--resume", "--workers", "2") == 0
    assert files_of(killed) == clean
    assert run("verify", killed, "--workers", "2") == 0


@pytest.mark.slow
def test_simulated_rirs_do_not_depend_on_workers(tmp_path):
    args = ["simulate-rir", "--count", "8", "--per-room", "2", "--seed", "1"]
    assert run(*args, "--out", tmp_path / "one") == 0
    assert run(*args, "--out", tmp_path / "two", "--workers", "2") == 0
    assert files_of(tmp_path / "one") == files_of(tmp_path / "two")
