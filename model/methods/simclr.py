"""SimCLR (Chen et al. 2020) for speakers: NT-Xent between two crops of one utterance, with the
negatives of every rank (gathered with gradients, so the loss is that of the global batch), less
the items of the anchor's own group (session), which are the same speaker."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from voxstream.model import distributed, monitors
from voxstream.model.methods.base import MethodConfig, SSLMethod
from voxstream.model.methods.parts import encode_views, mlp
from voxstream.model.ssps import Positives


@dataclass
class Config(MethodConfig):
    name: str = "simclr"
    # Temperature 0.2 and a Linear(2048)-ReLU-Linear(256) projector: sslsv SimCLRConfig as of
    # commit c2c7af5 (May 2024). sslsv later moved to T 0.5 and output 128 (a15cc8b, Sept 2024),
    # then to a 3-layer BatchNorm projector (3f2bf7d, Nov 2024); these are the earlier values.
    temperature: float = 0.2
    enable_projector: bool = True
    projector_hidden_dim: int = 2048
    projector_output_dim: int = 256


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float,
            groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent of this rank's 2B anchors against the 2N samples of all ranks; (loss, top-1 accuracy).

    An anchor's denominator holds its positive and every sample of another group (`groups`, int64
    [B]; None: each item its own group, the plain NT-Xent). The mean over ranks of this loss is the
    single-process loss over the concatenated batch, and gather_with_grad's backward makes the
    DDP-averaged gradient that of the global loss.
    """
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    anchors = torch.cat([z1, z2])
    samples = torch.cat([distributed.gather_with_grad(z1), distributed.gather_with_grad(z2)])
    b, n = len(z1), len(samples) // 2
    local = torch.arange(b, device=z1.device) + distributed.rank() * b
    positive = torch.cat([local + n, local])
    if groups is None:
        groups = local
    everyone = distributed.gather(groups).repeat(2)
    same = groups.repeat(2)[:, None] == everyone[None, :]  # itself included
    same[torch.arange(2 * b, device=z1.device), positive] = False
    logits = (anchors @ samples.T / temperature).masked_fill(same, float("-inf"))
    accuracy = (logits.argmax(dim=1) == positive).float().mean()
    return F.cross_entropy(logits, positive), accuracy


class SimCLR(SSLMethod):
    Config = Config
    SAMPLES_POSITIVES = True

    def __init__(self, encoder, cfg: Config, embed_dim: int):
        super().__init__(encoder, cfg, embed_dim)
        self.projector = (mlp([embed_dim, cfg.projector_hidden_dim, cfg.projector_output_dim],
                              batch_norm=False) if cfg.enable_projector else torch.nn.Identity())

    def forward(self, views: list[torch.Tensor], groups: torch.Tensor | None = None,
                positives: Positives | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_views(views)
        y1, y2 = encode_views(self.encoder, views)
        z1, z2 = self.projector(y1), self.projector(y2)
        if positives is not None:  # SSPS: the second view's output is the positive branch
            z2 = positives.swap(z2)
        loss, accuracy = nt_xent(z1, z2, self.cfg.temperature, groups)
        y = y1.detach()
        return loss, {"loss": loss.detach(), "accuracy": accuracy,
                      "embedding_std": monitors.embedding_std(y), "effective_rank": monitors.effective_rank(y)}
