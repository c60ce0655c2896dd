"""Shared-memory slots that carry batches from the worker processes to the trainer, allocated once.

A worker that returned a fresh shared tensor per batch would create new shared memory and fault in
every page of it, and the trainer would map it again: about 6 ms per 4 MB on a 2-core VM, a quarter
of a worker's time at 64 pairs a batch. Instead the trainer maps one file (memfd) per pass, with
`slots` batch slots per worker, and hands its descriptor to the workers; a worker stacks a batch
into its next slot and sends only the slot's number. Which slots may be reused is the workers'
protocol's business (pipeline/workers.py): this file is only the memory layout.
"""
from __future__ import annotations

import mmap
import os
import tempfile
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Layout:
    workers: int
    slots: int
    batch_size: int
    frames: tuple[int, ...]  # samples per view

    @property
    def nbytes(self) -> int:
        return self.workers * self.slots * self.batch_size * sum(self.frames) * 2


def _anonymous_file(size: int) -> int:
    """A descriptor of `size` zero bytes with no name: memory freed when the last user closes it."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("voxstream-ring")
    else:  # macOS: an unlinked temporary file
        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    os.ftruncate(fd, size)
    return fd


class Ring:
    """int16 `[B, T_v]` arrays per view, for each (worker, slot), in one shared mapping."""

    def __init__(self, layout: Layout, fd: int | None = None):
        self.layout = layout
        self.fd = _anonymous_file(layout.nbytes) if fd is None else fd
        self.memory = mmap.mmap(self.fd, layout.nbytes)
        self.views, offset = [], 0
        for f in layout.frames:
            count = layout.workers * layout.slots * layout.batch_size * f
            view = np.frombuffer(self.memory, np.int16, count, offset)
            self.views.append(view.reshape(layout.workers, layout.slots, layout.batch_size, f))
            offset += 2 * count

    def put(self, worker: int, slot: int, views: list[list[np.ndarray]]) -> None:
        """Stack a batch (its crops, view by view) into a slot."""
        for rows, view in zip(views, self.views):
            np.stack(rows, out=view[worker, slot])

    def get(self, worker: int, slot: int) -> list[np.ndarray]:
        """The views of the batch in a slot: the shared memory itself, valid until the slot is reused."""
        return [view[worker, slot] for view in self.views]

    def close(self) -> None:
        """Unmap and close the descriptor: the memory goes once no process maps it any more."""
        self.views = []
        try:
            self.memory.close()
        except BufferError:
            pass  # someone still holds a view of a slot: the mapping goes with it
        os.close(self.fd)
