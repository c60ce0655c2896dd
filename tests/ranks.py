"""The tests' 2-rank harness: a function run in real processes joined in one gloo group."""
from __future__ import annotations

import tempfile
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_ranks(fn: Callable[..., Any], *args, world: int = 2) -> list[Any]:
    """fn(rank, world, *args) in `world` processes of one gloo group; what each returned, by rank.
    fn must be importable (module level) and return something torch.save can write."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(world, tmp, fn, args), nprocs=world, join=True)
        return [torch.load(f"{tmp}/{r}.pt", weights_only=False) for r in range(world)]


def _rank(rank: int, world: int, tmp: str, fn: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(1)  # the ranks share the CPU
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world, *args), f"{tmp}/{rank}.pt")
    finally:
        dist.destroy_process_group()
