"""Attentive statistics pooling (Okabe et al. 2018), with ECAPA-TDNN's optional global context."""
from __future__ import annotations

import torch
from torch import nn


def _stats(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean and std over time; w sums to 1 over the last dim."""
    mean = (x * w).sum(dim=-1)
    var = (x.square() * w).sum(dim=-1) - mean.square()
    return mean, var.clamp(min=1e-4).sqrt()


class AttentiveStatsPool(nn.Module):
    """[B, C, T] -> [B, 2C]: mean and std under a learned per-channel attention over frames."""

    def __init__(self, channels: int, bottleneck: int = 128, global_context: bool = True):
        super().__init__()
        self.global_context = global_context
        self.attention = nn.Sequential(
            nn.Conv1d(channels * (3 if global_context else 1), bottleneck, kernel_size=1),
            nn.ReLU(), nn.BatchNorm1d(bottleneck), nn.Tanh(),
            nn.Conv1d(bottleneck, channels, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = x
        if self.global_context:  # let the attention see utterance-level mean and std
            mean, std = _stats(x.float(), torch.full_like(x[:, :1].float(), 1 / x.shape[-1]))
            t = x.shape[-1]
            context = torch.cat([x, mean.unsqueeze(-1).expand(-1, -1, t).to(x.dtype),
                                 std.unsqueeze(-1).expand(-1, -1, t).to(x.dtype)], dim=1)
        w = torch.softmax(self.attention(context).float(), dim=-1)
        # E[x^2] - E[x]^2 cancels catastrophically in bf16: the statistics are taken in fp32.
        mean, std = _stats(x.float(), w)
        return torch.cat([mean, std], dim=1)
