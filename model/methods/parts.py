"""Pieces several methods share: MLP heads and momentum (EMA) copies of a network."""
from __future__ import annotations

import copy

import torch
from torch import nn


def mlp(dims: list[int], batch_norm: bool = True, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear layers through dims; (BatchNorm), activation between them, none after the last."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers += [nn.BatchNorm1d(d_out)] if batch_norm else []
            layers.append(act())
    return nn.Sequential(*layers)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy that only ever changes through ema_update (no gradients, no optimizer)."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * source, parameters only (the target's
    BatchNorm statistics come from its own forward passes, as in MoCo and DINO)."""
    t, s = list(target.parameters()), list(source.parameters())
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1 - momentum)


def encode_views(encoder: nn.Module, views: list[torch.Tensor]) -> list[torch.Tensor]:
    """Embeddings of each view, in order. Views of one duration go through the encoder in one
    batch (DINO's multi-crop trick): fewer, larger passes, and shared BatchNorm statistics."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(views)
    by_length: dict[int, list[int]] = {}
    for i, v in enumerate(views):
        by_length.setdefault(v.shape[-1], []).append(i)
    for idx in by_length.values():
        for i, y in zip(idx, encoder(torch.cat([views[i] for i in idx])).chunk(len(idx))):
            out[i] = y
    return out
