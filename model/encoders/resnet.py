"""Thin ResNet-34 for speaker embeddings (Chung et al. 2020, voxceleb_trainer's ResNetSE34L):
basic SE blocks [3, 4, 6, 3], widths w/8, w/4, w/2, w (w=128: about 1.4 M parameters)."""
from __future__ import annotations

import torch
from torch import nn

from voxstream.model.encoders.pooling import AttentiveStatsPool


class SEBasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, se_reduction: int = 8):
        super().__init__()
        hidden = max(c_out // se_reduction, 1)
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(c_out, hidden, 1), nn.ReLU(),
            nn.Conv2d(hidden, c_out, 1), nn.Sigmoid())
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return torch.relu(y * self.se(y) + self.shortcut(x))


class ThinResNet34(nn.Module):
    """log-mel [B, n_mels, T] -> embedding [B, embed_dim]; `channels` is the last stage's width."""

    def __init__(self, n_mels: int = 80, channels: int = 128, embed_dim: int = 256):
        super().__init__()
        if channels % 8:
            raise ValueError(f"model.channels={channels} must be a multiple of 8 for resnet34")
        widths = [channels // 8, channels // 4, channels // 2, channels]
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, c_in = [], widths[0]
        for width, depth, stride in zip(widths, (3, 4, 6, 3), (1, 2, 2, 2)):
            stages += [SEBasicBlock(c_in, width, stride)]
            stages += [SEBasicBlock(width, width, 1) for _ in range(depth - 1)]
            c_in = width
        self.stages = nn.Sequential(*stages)
        # Frequency is averaged out (as in ResNetSE34L) rather than flattened into the channels:
        # that keeps the pooling and the embedding layer small, which is what makes this net thin.
        self.pool = AttentiveStatsPool(channels, global_context=False)
        self.head = nn.Sequential(nn.Linear(2 * channels, embed_dim), nn.BatchNorm1d(embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x.unsqueeze(1)))  # [B, C, F/8, T/8]
        return self.head(self.pool(x.mean(dim=2)))
