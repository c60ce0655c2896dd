"""DINO (Caron et al. 2021) for speakers, as in WeSpeaker's voxceleb/v3 and sslsv: a student matches
a momentum teacher's sharpened, centered distribution over 65,536 prototypes; the teacher sees the
global crops, the student every crop. Evaluation uses the teacher."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from voxstream.model import distributed, monitors
from voxstream.model.methods.base import MethodConfig, SSLMethod
from voxstream.model.methods.parts import ema_update, encode_views, frozen_copy, mlp
from voxstream.model.schedules import cosine
from voxstream.model.ssps import Positives


@dataclass
class Config(MethodConfig):
    name: str = "dino"
    global_views: int = 2                 # DINO / WeSpeaker: 2 global crops, the rest are local
    out_dim: int = 65536                  # prototypes (WeSpeaker dino_head_args.out_dim)
    hidden_dim: int = 2048                # WeSpeaker / DINO head defaults
    bottleneck_dim: int = 256
    head_batch_norm: bool = True          # WeSpeaker use_bn: True
    student_temp: float = 0.1             # WeSpeaker dino_loss_args
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_fraction: float = 0.2   # WeSpeaker warmup_teacher_temp_epochs_ratio
    center_momentum: float = 0.9
    teacher_momentum: float = 0.996       # cosine to 1 (WeSpeaker momentum_teacher)
    freeze_last_layer_fraction: float = 1 / 150  # WeSpeaker: first epoch of 150


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> prototypes with unit-norm weights (DINO's weight-normalised
    last layer with its gain fixed at 1, written out)."""

    def __init__(self, in_dim: int, cfg: Config):
        super().__init__()
        self.mlp = mlp([in_dim, cfg.hidden_dim, cfg.hidden_dim, cfg.bottleneck_dim], cfg.head_batch_norm, nn.GELU)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.Linear(cfg.bottleneck_dim, cfg.out_dim, bias=False)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(y), dim=-1)
        return F.linear(x, F.normalize(self.last_layer.weight, dim=-1))


class DINO(SSLMethod):
    Config = Config
    SAMPLES_POSITIVES = True

    def __init__(self, encoder, cfg: Config, embed_dim: int):
        super().__init__(encoder, cfg, embed_dim)
        self.head = DINOHead(embed_dim, cfg)
        self.teacher_encoder = frozen_copy(encoder)
        self.teacher_head = frozen_copy(self.head)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        # step / total_steps of the last after_step: the schedules read the Python number
        # (host_progress); the buffer carries it across a resume.
        self.host_progress = 0.0
        self.register_buffer("progress", torch.zeros((), dtype=torch.float64))
        # Zeroing the prototypes' gradient early stabilises training (DINO's freeze_last_layer);
        # a hook keeps the parameter in the graph, so DDP needs no find_unused_parameters.
        self.head.last_layer.weight.register_hook(
            lambda g: g * 0 if self.host_progress < cfg.freeze_last_layer_fraction else g)

    def view_counts(self) -> tuple[int, int | None]:
        return self.cfg.global_views + 1, None  # the global crops, then at least one local crop

    def teacher_temp(self) -> float:
        """Linear warm-up of the teacher temperature: a hot teacher early makes training unstable."""
        cfg, p = self.cfg, self.host_progress
        if p >= cfg.warmup_teacher_temp_fraction:
            return cfg.teacher_temp
        return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * p / cfg.warmup_teacher_temp_fraction

    def forward(self, views: list[torch.Tensor], groups: torch.Tensor | None = None,
                positives: Positives | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_views(views)  # no negatives: groups unused
        g = self.cfg.global_views
        with torch.no_grad():
            teacher_embeddings = encode_views(self.teacher_encoder, views[:g])
            if positives is not None:  # SSPS: the teacher's embeddings (its current head applies to them)
                teacher_embeddings = [positives.swap(t) for t in teacher_embeddings]
            teacher_out = self.teacher_head(torch.cat(teacher_embeddings)).float()
            teacher = F.softmax((teacher_out - self.center) / self.teacher_temp(), dim=-1).chunk(g)
        embeddings = encode_views(self.encoder, views)
        student = F.log_softmax(self.head(torch.cat(embeddings)).float() / self.cfg.student_temp, dim=-1)
        student = student.chunk(len(views))
        # Cross-entropy of every student crop against every teacher crop of another view.
        terms = [-(t * s).sum(dim=-1).mean() for i, t in enumerate(teacher) for j, s in enumerate(student) if i != j]
        loss = torch.stack(terms).mean()
        self._update_center(teacher_out)
        y = embeddings[0].detach()
        return loss, {"loss": loss.detach(), "teacher_temp": loss.new_full((), self.teacher_temp()),
                      "teacher_entropy": monitors.entropy(torch.cat(teacher)),
                      "kl": monitors.kl_divergence(teacher[0], student[1].detach()),
                      "embedding_std": monitors.embedding_std(y), "effective_rank": monitors.effective_rank(y)}

    @torch.no_grad()
    def _update_center(self, teacher_out: torch.Tensor) -> None:
        """EMA of the teacher's mean output over every rank's batch: subtracting it keeps one
        prototype from dominating, the sharpening keeps the output from going uniform."""
        batch_center = distributed.all_reduce_mean(teacher_out.mean(dim=0, keepdim=True))
        self.center.mul_(self.cfg.center_momentum).add_(batch_center, alpha=1 - self.cfg.center_momentum)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        self.host_progress = step / max(total_steps, 1)
        self.progress.fill_(self.host_progress)
        m = cosine(step, total_steps, self.cfg.teacher_momentum, 1.0)
        ema_update(self.teacher_encoder, self.encoder, m)
        ema_update(self.teacher_head, self.head, m)

    def restore_host_state(self) -> None:
        self.host_progress = self.progress.item()

    def embedder(self) -> nn.Module:
        return self.teacher_encoder
