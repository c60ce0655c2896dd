"""Lean worker processes that produce a rank's batches (`python -m voxstream.pipeline.workers`, no torch).

Why not torch's DataLoader workers: they are forks of the trainer, so each maps all the trainer's
memory (importing torch alone makes a process 500 MB resident) and touches, and so copies, much of
it. These workers are fresh interpreters that import only the pipeline, and they start in their own
process group, so a signal meant for the trainer (torchrun's SIGTERM, Ctrl-C) cannot kill them in
the middle of a step: the trainer stops them itself, and they exit when it dies (their pipes close).

Protocol, per worker, over two pipes. The trainer sends the stream's Plan and the ring's layout
(pipeline/ring.py; the ring's descriptor is inherited). The worker stacks each batch into its next
slot and sends ("batch", slot, keys, groups, labels, indices, speakers, stats), which `receive` hands on as a Ready. It may
fill all `slots` slots ahead; after that it waits for a credit before each batch, which the trainer
sends once it has copied a batch out, so a slot is never overwritten before it has been read. An
exception in a worker is sent back (with its traceback) and raised in the trainer.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import traceback
from multiprocessing.connection import Connection
from typing import NamedTuple

from voxstream.pipeline.batches import Plan, by_view, stream_batches
from voxstream.pipeline.ring import Layout, Ring
from voxstream.pipeline.stats import StreamStats

_STOP_TIMEOUT_S = 5.0


class Ready(NamedTuple):
    """A batch that a worker has stacked into one of its slots."""
    worker: int
    slot: int
    keys: list[str]
    groups: list[str]
    labels: list[int]
    indices: list[int]  # global indices (pipeline/sources.py), -1 where unknown
    speakers: list[str]
    stats: StreamStats  # the worker's stream's, so far


class Workers:
    """The worker processes of one pass over a rank's epoch, and their ring of `slots` batch slots
    each. Step i of the pass comes from worker i % count: `receive(i)` says where it is (a Ready),
    `ring.get(worker, slot)` gives its views, and `free(worker)` gives the slot back."""

    def __init__(self, plan: Plan, count: int, slots: int):
        self.count = count
        self.ring = ring = Ring(Layout(count, slots, plan.cfg.batch_size, tuple(plan.frames)))
        self.procs: list[subprocess.Popen] = []
        self.tasks: list[Connection] = []
        self.results: list[Connection] = []
        try:
            for worker in range(count):
                task_r, task_w = os.pipe()
                result_r, result_w = os.pipe()
                fds = (task_r, result_w, ring.fd)
                self.procs.append(subprocess.Popen([sys.executable, "-m", "voxstream.pipeline.workers", *map(str, fds)],
                                                   pass_fds=fds, process_group=0))
                os.close(task_r)
                os.close(result_w)
                self.tasks.append(Connection(task_w, readable=False))
                self.results.append(Connection(result_r, writable=False))
                self.tasks[-1].send((plan, worker, count, ring.layout))
        except BaseException:
            self.close()
            raise

    def receive(self, step: int) -> Ready:
        """The batch of step `step` of the pass."""
        worker = step % self.count
        try:
            message = self.results[worker].recv()
        except EOFError:
            code = self.procs[worker].wait()
            raise RuntimeError(f"pipeline worker {worker} exited with code {code} (see its messages above)") from None
        if message[0] == "error":
            _, error, text = message
            error.add_note(f"in pipeline worker {worker}:\n{text}")
            raise error
        return Ready(worker, *message[1:])

    def free(self, worker: int) -> None:
        try:
            self.tasks[worker].send_bytes(b"")
        except BrokenPipeError:
            pass  # the worker has sent its last batch and exited

    def close(self) -> None:
        for connection in self.tasks + self.results:
            connection.close()
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.ring.close()


def _serve(tasks: Connection, results: Connection, ring_fd: int) -> None:
    plan, worker, count, layout = tasks.recv()
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s pipeline worker {worker} (rank {plan.rank}): %(message)s")
    ring = Ring(layout, ring_fd)
    try:
        for produced, (items, stats) in enumerate(stream_batches(plan, worker, count)):
            if produced >= layout.slots:
                tasks.recv_bytes()  # a credit: the trainer has copied out the batch that held this slot
            slot = produced % layout.slots
            ring.put(worker, slot, by_view(items, len(plan.cfg.views)))
            results.send(("batch", slot, [it.key for it in items], [it.group for it in items], [it.label for it in items],
                          [it.index for it in items], [it.speaker for it in items], stats))
    except (EOFError, BrokenPipeError):
        return  # the trainer has gone or stopped this pass
    except Exception as e:
        try:
            results.send(("error", e, traceback.format_exc()))
        except Exception:  # unpicklable: the text is enough
            results.send(("error", RuntimeError(str(e)), traceback.format_exc()))


def main(argv: list[str]) -> int:
    task_fd, result_fd, ring_fd = map(int, argv)
    _serve(Connection(task_fd, writable=False), Connection(result_fd, readable=False), ring_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
