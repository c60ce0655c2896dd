"""ECAPA-TDNN (Desplanques et al., Interspeech 2020): SE-Res2Net blocks, multi-layer feature
aggregation, attentive statistics pooling with global context. C=512: 6.2 M, C=1024: 14.7 M."""
from __future__ import annotations

import torch
from torch import nn

from voxstream.model.encoders.pooling import AttentiveStatsPool


def conv_relu_bn(c_in: int, c_out: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, kernel, dilation=dilation, padding=dilation * (kernel // 2)),
        nn.ReLU(), nn.BatchNorm1d(c_out))


class SqueezeExcite(nn.Module):
    """Channel gates from the utterance mean (Hu et al. 2018), bottleneck 128 as in the paper."""

    def __init__(self, channels: int, bottleneck: int = 128):
        super().__init__()
        self.gate = nn.Sequential(
            nn.Conv1d(channels, bottleneck, 1), nn.ReLU(),
            nn.Conv1d(bottleneck, channels, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x.mean(dim=-1, keepdim=True))


class Res2Conv(nn.Module):
    """Res2Net dilated convolution: `scale` channel groups, each sees the previous group's output,
    so one block covers several receptive fields at the cost of one."""

    def __init__(self, channels: int, kernel: int, dilation: int, scale: int = 8):
        super().__init__()
        if channels % scale:
            raise ValueError(f"model.channels={channels} must be a multiple of {scale} (Res2Net scale)")
        self.width = channels // scale
        self.convs = nn.ModuleList(
            conv_relu_bn(self.width, self.width, kernel, dilation) for _ in range(scale - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = torch.split(x, self.width, dim=1)
        out, y = [], None
        for conv, g in zip(self.convs, groups):
            y = conv(g if y is None else g + y)
            out.append(y)
        return torch.cat(out + [groups[-1]], dim=1)  # the last group passes through unchanged


class SERes2Block(nn.Module):
    def __init__(self, channels: int, kernel: int, dilation: int):
        super().__init__()
        self.body = nn.Sequential(
            conv_relu_bn(channels, channels), Res2Conv(channels, kernel, dilation),
            conv_relu_bn(channels, channels), SqueezeExcite(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ECAPATDNN(nn.Module):
    """log-mel [B, n_mels, T] -> embedding [B, embed_dim]."""

    def __init__(self, n_mels: int = 80, channels: int = 512, embed_dim: int = 192):
        super().__init__()
        self.stem = conv_relu_bn(n_mels, channels, kernel=5)
        self.blocks = nn.ModuleList(SERes2Block(channels, 3, d) for d in (2, 3, 4))
        # The paper's MFA layer has 1536 channels for both C=512 and C=1024 (6.2 M / 14.7 M);
        # small demo models keep 3C so the aggregation is not wider than its input.
        mfa = min(3 * channels, 1536)
        self.mfa = conv_relu_bn(3 * channels, mfa)
        self.pool = AttentiveStatsPool(mfa, global_context=True)
        self.head = nn.Sequential(
            nn.BatchNorm1d(2 * mfa), nn.Linear(2 * mfa, embed_dim), nn.BatchNorm1d(embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        x = self.mfa(torch.cat(outs, dim=1))
        return self.head(self.pool(x))
