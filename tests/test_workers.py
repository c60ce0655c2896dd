"""The pipeline's worker processes: batches through the shared ring, credits, errors, clean-up."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from voxstream.pipeline.loader import make_loader
from voxstream.pipeline.stream import CorruptShard
from voxstream.pipeline.workers import Workers
from ramps import config, make_set
from voxstream.shards.format import shard_name


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("shards"))
    return url, make_set(url, [24, 24, 24])


def test_batches_through_workers_equal_the_in_process_stream(shard_set):
    """One worker runs the same single stream as no worker: its batches, copied out of the shared
    slots it reuses, must equal the in-process ones even when all are held at once."""
    url, _ = shard_set
    cfg = config(url, steps_per_epoch=10)
    inline = list(make_loader(cfg, 1, 0, 1))
    cfg.workers = 1
    through = list(make_loader(cfg, 1, 0, 1))
    assert [b.keys for b in through] == [b.keys for b in inline]
    for a, b in zip(through, inline):
        assert all(torch.equal(va, vb) for va, vb in zip(a.views, b.views))


def test_a_worker_waits_for_its_slot_to_be_freed_before_reusing_it(shard_set):
    url, _ = shard_set
    cfg = config(url, steps_per_epoch=6)
    expected = list(make_loader(cfg, 0, 0, 1))  # in process: the same single stream as one worker
    workers = Workers(make_loader(cfg, 0, 0, 1).plan, 1, slots=2)
    try:
        for step, want in enumerate(expected):
            ready = workers.receive(step)
            time.sleep(0.3)  # a worker that did not wait for its credit would overwrite the slot by now
            assert ready.keys == want.keys and ready.stats.batches == step + 1
            assert all(np.array_equal(got, v.numpy()) for got, v in zip(workers.ring.get(0, ready.slot), want.views))
            workers.free(0)
    finally:
        workers.close()


def test_an_error_in_a_worker_is_raised_in_the_trainer(tmp_path):
    url = str(tmp_path)
    make_set(url, [8])
    (tmp_path / shard_name("syn", 0)).write_bytes(b"not a tar" * 100)
    cfg = config(url, workers=1, strict=True)
    with pytest.raises(CorruptShard, match="syn-000000.tar") as caught:
        list(make_loader(cfg, 0, 0, 1))
    assert "in pipeline worker 0" in "".join(getattr(caught.value, "__notes__", []))


def test_workers_do_not_import_torch():
    """Lean workers: what they import decides their memory (torch alone is ~500 MB resident)."""
    code = "import sys, voxstream.pipeline.workers; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_worker_that_dies_is_reported_with_its_exit_code(shard_set):
    url, _ = shard_set
    cfg = config(url, workers=1, steps_per_epoch=40)
    workers = Workers(make_loader(cfg, 0, 0, 1).plan, 1, slots=2)
    try:
        workers.receive(0)
        workers.procs[0].send_signal(signal.SIGKILL)  # e.g. the kernel's OOM killer
        with pytest.raises(RuntimeError, match="pipeline worker 0 exited with code -9"):
            for step in range(1, 40):  # the batches it sent before dying come first
                workers.free(0)
                workers.receive(step)
    finally:
        workers.close()


def test_passes_release_their_descriptors_and_shared_memory(shard_set):
    url, _ = shard_set
    loader = make_loader(config(url, workers=2, steps_per_epoch=4), 0, 0, 1)
    list(loader)
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(3):  # an epoch each
        list(loader)
    assert sorted(os.listdir("/proc/self/fd")) == before
