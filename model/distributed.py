"""Collectives that degrade to identity without an initialised process group (one process, tests)."""
from __future__ import annotations

import torch
import torch.distributed as dist


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


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every rank, keeping the gradient path to this rank's slice.

    torch.distributed.nn.all_gather's backward all-reduces the incoming gradients, so each rank
    gets the gradient of the global loss w.r.t. its own samples (needed for SimCLR negatives).
    """
    if not is_dist():
        return x
    import torch.distributed.nn.functional as dnn
    return torch.cat(dnn.all_gather(x.contiguous()))


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
    import torch.distributed.nn.functional as dnn
    return dnn.all_reduce(x)
