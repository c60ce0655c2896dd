"""Speaker encoders selected by name from the recipe; each includes the fbank front-end."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from voxstream.model.features import Fbank
from voxstream.model.encoders.ecapa import ECAPATDNN
from voxstream.model.encoders.resnet import ThinResNet34

NETWORKS = {"ecapa": ECAPATDNN, "resnet34": ThinResNet34}


@dataclass
class EncoderConfig:
    """`channels` is ECAPA's C (512 or 1024) or the thin ResNet-34's last-stage width (128)."""
    name: str = "ecapa"
    channels: int = 512
    embed_dim: int = 192
    n_mels: int = 80


class Encoder(nn.Module):
    """float waveform [B, T] at 16 kHz -> embedding [B, embed_dim]."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.embed_dim = cfg.embed_dim
        self.features = Fbank(cfg.n_mels)
        self.net = NETWORKS[cfg.name](n_mels=cfg.n_mels, channels=cfg.channels, embed_dim=cfg.embed_dim)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.net(self.features(wave))


def compile_encoders(module: nn.Module) -> None:
    """torch.compile every encoder inside `module` (student and teacher) in place. The methods' own
    Python-side state (queues and their pointers, SSPS swaps) stays eager, and the state_dict keys
    stay those of the eager module, so checkpoints do not depend on train.compile."""
    for m in module.modules():
        if isinstance(m, Encoder):
            m.compile()


def build_encoder(cfg: EncoderConfig) -> Encoder:
    if cfg.name not in NETWORKS:
        raise ValueError(f"model.name={cfg.name!r} is not an encoder; choose one of {sorted(NETWORKS)}")
    return Encoder(cfg)
