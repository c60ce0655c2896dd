"""AAM-softmax (additive angular margin, ArcFace; Deng et al. 2019) over the batch's labels as classes.

With a labels file (`data.labels`) the groups are pseudo-speakers: the classifier learns what
clustering found, as in Miara, Lepage & Dehak (AHC pseudo-speakers, margin 0.2, scale 30) and in
Hyperion's self-supervised rounds. With a labels file made from the metadata's speakers it is the
supervised baseline, by the same code. Every view of an item is one training sample of its class.

The margin grows from 0 to `margin` between the fractions `margin_start` and `margin_end` of
training, along WeSpeaker's exponential ramp (1 - 0.001^p); a margin from the first step makes a
randomly initialised network's targets unreachable, and training stalls.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from voxstream.model import monitors
from voxstream.model.methods.base import MethodConfig, SSLMethod
from voxstream.model.methods.parts import encode_views


@dataclass
class Config(MethodConfig):
    name: str = "aam"
    classes: int = 0             # number of (pseudo-)speakers in data.labels
    margin: float = 0.2          # final additive angular margin (radians): WeSpeaker and Miara et al.
    scale: float = 32.0          # logit scale: WeSpeaker 32 (Miara et al. 30)
    margin_start: float = 0.13   # fraction of training where the margin starts to grow (WeSpeaker:
    margin_end: float = 0.27     # epochs 20 to 40 of 150)


def margin_at(progress: float, cfg: Config) -> float:
    """The margin at a fraction of training: 0, WeSpeaker's exponential ramp, then `cfg.margin`."""
    if progress <= cfg.margin_start:
        return 0.0
    if progress >= cfg.margin_end:
        return cfg.margin
    p = (progress - cfg.margin_start) / (cfg.margin_end - cfg.margin_start)
    return cfg.margin * (1.0 - 0.001 ** p)


def aam_logits(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, margin: float,
               scale: float) -> torch.Tensor:
    """scale * cos(angle + margin) for each sample's own class, scale * cos(angle) for the others.

    Past angle + margin = pi the cosine would rise again and reward a worse angle; there the target
    logit falls on the line cos(angle) - margin * sin(margin), as in ArcFace's reference code.
    """
    cosine = F.normalize(x.float(), dim=1) @ F.normalize(weight.float(), dim=1).T
    target = cosine.gather(1, labels[:, None])
    sine = (1.0 - target.square()).clamp_min(1e-12).sqrt()
    with_margin = target * math.cos(margin) - sine * math.sin(margin)
    with_margin = torch.where(target > math.cos(math.pi - margin), with_margin, target - margin * math.sin(margin))
    return scale * cosine.scatter(1, labels[:, None], with_margin)


class AAM(SSLMethod):
    Config = Config

    def __init__(self, encoder: nn.Module, cfg: Config, embed_dim: int):
        super().__init__(encoder, cfg, embed_dim)
        if cfg.classes < 2:
            raise ValueError(f"method.classes: need the number of classes in data.labels (>= 2), got {cfg.classes}")
        self.weight = nn.Parameter(torch.randn(cfg.classes, embed_dim) * 0.01)
        # The margin is a host number (no device read in a step); the buffer carries it across a resume.
        self.margin = 0.0
        self.register_buffer("progress", torch.zeros((), dtype=torch.float64))

    def view_counts(self) -> tuple[int, int | None]:
        return 1, None  # every view is one more sample of its class

    def forward(self, views: list[torch.Tensor], groups: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_views(views)
        if groups is None:
            raise ValueError("aam needs class labels: set data.labels to a labels file")
        embeddings = encode_views(self.encoder, views)
        x, labels = torch.cat(embeddings), groups.repeat(len(views))
        logits = aam_logits(x, self.weight, labels, self.margin, self.cfg.scale)
        loss = F.cross_entropy(logits, labels)
        y = embeddings[0].detach()
        return loss, {"loss": loss.detach(), "margin": loss.new_tensor(self.margin),
                      "accuracy": (logits.argmax(1) == labels).float().mean(),
                      "embedding_std": monitors.embedding_std(y), "effective_rank": monitors.effective_rank(y)}

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        progress = (step + 1) / max(total_steps, 1)  # the share of training done
        self.progress.fill_(progress)
        self.margin = margin_at(progress, self.cfg)

    def restore_host_state(self) -> None:
        self.margin = margin_at(self.progress.item(), self.cfg)
