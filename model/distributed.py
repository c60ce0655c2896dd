"""Joining the process group under torchrun, and collectives that degrade to identity without one
(one process, tests)."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def setup_distributed() -> tuple[torch.device, dist.ProcessGroup | None]:
    """(device, CPU group for control flags); a process group when launched by torchrun.

    Stop flags and RNG states travel over gloo even when gradients use NCCL, so checking them
    every step does not synchronise the GPU.
    """
    if "RANK" not in os.environ:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu"), None
    timeout = timedelta(minutes=30)
    join = dict(timeout=timeout, store=attempt_store(timeout), rank=int(os.environ["RANK"]),
                world_size=int(os.environ["WORLD_SIZE"]))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, **join)
        return device, dist.new_group(backend="gloo")
    dist.init_process_group("gloo", **join)
    return torch.device("cpu"), dist.group.WORLD


def attempt_store(timeout: timedelta) -> dist.Store | None:
    """torchrun's own store, seen through a prefix per restart of the group (`--max-restarts`).

    The agent's store keeps the keys of the attempt before: a restarted rank that starts first reads
    the dead rank's gloo address there and fails (connection refused) or waits on it. None where the
    agent does not serve the store (env:// then joins as usual)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"voxstream/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every rank along dim 0, rank order; no gradient (queues, centers)."""
    if not is_dist():
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        return gather(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[rank() * ctx.rows:(rank() + 1) * ctx.rows]


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every rank, keeping the gradient path to this rank's slice.

    The backward all-reduces the incoming gradients, so each rank gets the gradient of the sum of
    every rank's loss w.r.t. its own samples (needed for SimCLR negatives). Same-size x on all ranks.
    """
    if not is_dist():
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if not is_dist():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum x over ranks, out of place, with autograd (backward sums the gradients over ranks).

    Like gather_with_grad, the gradient each rank receives is that of the sum of every rank's
    loss; when each rank computes the same global loss, DDP's gradient averaging turns it back
    into the global loss's gradient. Also fine under no_grad (Sinkhorn's sums).
    """
    if not is_dist():
        return x
    return _AllReduceSum.apply(x)
