"""Shared-memory slots that carry batches from DataLoader workers to the trainer, allocated once.

A worker that returns a fresh tensor per batch allocates new shared memory (shm_open, ftruncate, mmap)
and faults in every page of it, and the trainer maps it again: about 6 ms per 4 MB on a 2-core VM,
a quarter of a worker's time at 64 pairs a batch. Instead the trainer allocates each worker's slots
once per epoch, before the workers start (forked workers inherit them; spawned ones receive them
pickled, still shared), and a worker sends only a slot number with the batch's keys.

A semaphore per worker counts its free slots: the worker takes one before stacking a batch into it,
the trainer gives it back once it has copied the batch out, so no slot is overwritten while it is
read, whatever DataLoader does. With `prefetch + 1` slots a worker never waits: DataLoader asks a
worker for a batch only after receiving one of the `prefetch` it has in flight, and the trainer
copies each batch out as it arrives.
"""
from __future__ import annotations

import os
from multiprocessing.context import BaseContext

import numpy as np
import torch

_WAIT_S = 1.0  # between checks that the trainer is still alive while a worker waits for a slot


def _shared(shape: tuple[int, ...]) -> torch.Tensor:
    """An int16 tensor in shared memory, allocated there directly (no private copy to fault in)."""
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * 2)
    return torch.empty(0, dtype=torch.int16).set_(storage).view(shape)


class Ring:
    """`slots` batch slots per worker, one int16 `[B, T_v]` tensor per view in each."""

    def __init__(self, workers: int, slots: int, batch_size: int, frames: list[int], context: BaseContext):
        self.views = [_shared((workers, slots, batch_size, f)) for f in frames]
        self.free = [context.Semaphore(slots) for _ in range(workers)]
        self.slots = slots
        self.trainer = os.getpid()

    def put(self, worker: int, count: int, views: list[list[np.ndarray]]) -> int:
        """In worker `worker`: stack its `count`-th batch (crops per view) into the next slot; returns it."""
        while not self.free[worker].acquire(timeout=_WAIT_S):
            if os.getppid() != self.trainer:
                raise SystemExit("the trainer is gone")
        slot = count % self.slots  # batches are consumed in order, so slots are freed in order
        for crops, view in zip(views, self.views):
            np.stack(crops, out=view[worker, slot].numpy())
        return slot

    def take(self, worker: int, slot: int, pin: bool) -> list[torch.Tensor]:
        """In the trainer: the batch in a slot, copied out (into pinned memory when `pin`); frees the slot."""
        out = [torch.empty(v.shape[2:], dtype=v.dtype, pin_memory=pin).copy_(v[worker, slot]) for v in self.views]
        self.free[worker].release()
        return out
