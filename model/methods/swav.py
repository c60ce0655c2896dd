"""SwAV (Caron et al., NeurIPS 2020): swapped prediction of online cluster assignments.

Projections are scored against learnable unit-norm prototypes. Sinkhorn-Knopp turns the scores of
each global view into soft assignments that split the batch evenly over the prototypes; every other
view (multi-crop: global and local) must predict that assignment from its own scores. A queue of
recent projections enlarges the batch Sinkhorn equipartitions over when batches are small.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from voxstream.model.distributed import all_reduce_sum, gather, rank, world_size
from voxstream.model.methods.base import MethodConfig, SSLMethod
from voxstream.model.methods.parts import encode_views, mlp
from voxstream.model.monitors import effective_rank, embedding_std

@dataclass
class Config(MethodConfig):
    name: str = "swav"
    # Softmax temperature 0.1: SwAV paper / reference code and sslsv SwAVConfig.temperature.
    temperature: float = 0.1
    # 6000 prototypes: sslsv VoxCeleb2 recipe swav_proj-2048-BN-R-2048-BN-R-512_K-6000_t-0.1
    # (sslsv's class default and the paper's ImageNet value are 3000).
    prototypes: int = 6000
    # Sinkhorn-Knopp epsilon 0.05 and 3 iterations: paper / reference code, sslsv sk_epsilon and
    # sk_nb_iters.
    sinkhorn_epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    # Queue of 3840 projections (global, over all ranks): reference code's small-batch setting and
    # sslsv queue_size; 0 disables it. Filled once this fraction of training is done, used once
    # full: sslsv queue_start_epoch 15 of its 100 epochs (SwAVConfig, TrainerConfig.epochs).
    queue_size: int = 3840
    queue_start_fraction: float = 0.15
    # Prototypes get no gradient for this first fraction of training: sslsv freeze_prototypes_epochs
    # 1 of 100 (the reference code's 313 iterations are one ImageNet epoch at batch 4096).
    freeze_prototypes_fraction: float = 0.01
    # The first `assign_views` views (the global crops) get assignments: reference code's
    # crops_for_assign [0, 1].
    assign_views: int = 2
    # Projector 2048-BN-R-2048-BN-R-512: sslsv VoxCeleb2 recipe (paper: 2048-BN-R-128 on ImageNet).
    projector_hidden_dim: int = 2048
    projector_output_dim: int = 512


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Soft assignments [B, K] of prototype scores [B, K] that spread the global batch evenly.

    Sinkhorn-Knopp as in SwAV's Algorithm 1: alternately give every prototype 1/K of the mass and
    every sample 1/B. Sums over samples are all-reduced, so the ranks solve one problem over the
    global batch; each row of the result sums to 1.
    """
    q = torch.exp(scores.float() / epsilon).T  # [K, B]; scores are cosines, so no overflow
    k, b = q.shape[0], all_reduce_sum(q.new_full((), float(q.shape[1])))
    q /= all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True)) * k
        q /= q.sum(dim=0, keepdim=True) * b
    return (q * b).T


class SwAV(SSLMethod):
    Config = Config

    def __init__(self, encoder: nn.Module, cfg: Config, embed_dim: int):
        super().__init__(encoder, cfg, embed_dim)
        dim = cfg.projector_output_dim
        self.projector = mlp([embed_dim, cfg.projector_hidden_dim, cfg.projector_hidden_dim, dim])
        self.prototypes = nn.Parameter(F.normalize(torch.randn(cfg.prototypes, dim), dim=1))
        # The queue holds the global batch's projections (gathered, identical on every rank, so
        # DDP's buffer broadcast is harmless and a resume may change the number of ranks); rank r
        # feeds Sinkhorn the rows r::world_size, so the ranks together use each row exactly once.
        self.register_buffer("queue", torch.zeros(cfg.assign_views, cfg.queue_size, dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        # The fraction of training done, for the freeze and the queue. Decisions read the Python
        # numbers (host_*); the buffers carry them across a resume.
        self.register_buffer("progress", torch.zeros((), dtype=torch.float64))
        self.host_progress, self.host_queue_filled = 0.0, 0

    def view_counts(self) -> tuple[int, int | None]:
        return max(self.cfg.assign_views, 2), None  # every assignment view is predicted by another

    def forward(self, views: list[torch.Tensor], groups: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # no negatives: groups unused
        self.check_views(views)
        n_assign = self.cfg.assign_views
        ys = encode_views(self.encoder, views)
        zs = [F.normalize(self.projector(y).float(), dim=1) for y in ys]
        with torch.autocast(zs[0].device.type, enabled=False):  # Sinkhorn's exp(score / 0.05) needs fp32
            loss, use_queue = self._swapped_prediction(zs)
        if self.training:
            self._enqueue(zs[:n_assign])
        y = ys[0].detach()
        return loss, {"loss": loss.detach(), "queue_used": loss.new_full((), float(use_queue)),
                      "embedding_std": embedding_std(y), "effective_rank": effective_rank(y)}

    def _swapped_prediction(self, zs: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """Each assignment view's Sinkhorn codes, predicted from every other view's scores."""
        w = F.normalize(self.prototypes.float(), dim=1)  # the normalised linear layer
        if self.training and w.requires_grad and self.host_progress < self.cfg.freeze_prototypes_fraction:
            w.register_hook(torch.zeros_like)  # zero rather than drop the gradient: DDP sees them used
        scores = [z @ w.T for z in zs]
        use_queue = self.cfg.queue_size > 0 and self.host_queue_filled == self.cfg.queue_size
        n_assign = self.cfg.assign_views
        loss = scores[0].new_zeros(())
        for i in range(n_assign):
            q = self._assignments(i, scores[i].detach(), w.detach(), use_queue)
            predictions = [s / self.cfg.temperature for j, s in enumerate(scores) if j != i]
            loss = loss + sum(_cross_entropy(q, p) for p in predictions) / len(predictions)
        return loss / n_assign, use_queue

    def _assignments(self, i: int, scores: torch.Tensor, w: torch.Tensor, use_queue: bool) -> torch.Tensor:
        """Sinkhorn assignments of view i's batch, solved together with this rank's share of the queue."""
        n = len(scores)
        if use_queue:
            scores = torch.cat([scores, self.queue[i, rank()::world_size()] @ w.T])
        return sinkhorn(scores, self.cfg.sinkhorn_epsilon, self.cfg.sinkhorn_iterations)[:n]

    @torch.no_grad()
    def _enqueue(self, zs: list[torch.Tensor]) -> None:
        if self.cfg.queue_size == 0 or self.host_progress < self.cfg.queue_start_fraction:
            return
        fresh = torch.stack([gather(z.detach()) for z in zs])  # [V, global batch, D]
        self.queue.copy_(torch.cat([fresh, self.queue], dim=1)[:, : self.cfg.queue_size])
        self.host_queue_filled = min(self.host_queue_filled + fresh.shape[1], self.cfg.queue_size)
        self.queue_filled.fill_(self.host_queue_filled)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        self.host_progress = (step + 1) / max(total_steps, 1)  # steps done: the next forward's position
        self.progress.fill_(self.host_progress)

    def restore_host_state(self) -> None:
        self.host_progress, self.host_queue_filled = self.progress.item(), int(self.queue_filled)


def _cross_entropy(targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
