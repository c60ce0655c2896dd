"""MoCo v2 (He et al. 2020; Chen et al. 2020) for speakers: queries from the encoder, keys from its
momentum copy, negatives from a queue of past keys of every rank; symmetric loss over both views."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from voxstream.model import distributed, monitors
from voxstream.model.methods.base import MethodConfig, SSLMethod
from voxstream.model.methods.parts import ema_update, encode_views, frozen_copy, mlp
from voxstream.model.ssps import Positives


@dataclass
class Config(MethodConfig):
    name: str = "moco"
    temperature: float = 0.2         # sslsv MoCoConfig
    queue_size: int = 65536          # sslsv MoCoConfig, WeSpeaker v3 moco (K)
    momentum: float = 0.999          # sslsv start_tau, WeSpeaker m
    enable_projector: bool = True    # sslsv: 3-layer MLP with BatchNorm
    projector_hidden_dim: int = 2048
    projector_output_dim: int = 128
    shuffle_bn: bool = True          # MoCo's shuffled BatchNorm for the keys across ranks


class MoCo(SSLMethod):
    Config = Config
    SAMPLES_POSITIVES = True

    def __init__(self, encoder, cfg: Config, embed_dim: int):
        super().__init__(encoder, cfg, embed_dim)
        dim = cfg.projector_output_dim if cfg.enable_projector else embed_dim
        self.projector = (mlp([embed_dim, cfg.projector_hidden_dim, cfg.projector_hidden_dim, dim])
                          if cfg.enable_projector else torch.nn.Identity())
        self.momentum_encoder = frozen_copy(encoder)
        self.momentum_projector = frozen_copy(self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        # The group of each queued key (-1: none), so a query skips the keys of its own session.
        self.register_buffer("queue_groups", torch.full((cfg.queue_size,), -1, dtype=torch.long))

    def forward(self, views: list[torch.Tensor], groups: torch.Tensor | None = None,
                positives: Positives | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_views(views)
        y1, y2 = encode_views(self.encoder, views)
        q1, q2 = F.normalize(self.projector(y1).float(), dim=1), F.normalize(self.projector(y2).float(), dim=1)
        with torch.no_grad():
            k1, k2 = (F.normalize(k.float(), dim=1) for k in self._keys(views))
        if groups is None:  # each item its own group: nothing queued shares it
            groups = torch.full((len(q1),), -1, dtype=torch.long, device=q1.device)
        own = (self.queue_groups[None, :] == groups[:, None]) & (groups[:, None] >= 0)
        # Autograd keeps the queue for the gradient of q @ queue.T, and _enqueue below overwrites
        # it in place before backward: on the buffer itself backward would raise (a saved tensor
        # was modified). The copy keeps the keys this loss was computed against.
        queue = self.queue.clone()
        p1, p2 = (positives.swap(k1), positives.swap(k2)) if positives is not None else (k1, k2)  # SSPS
        loss = (self._infonce(q1, p2, queue, own) + self._infonce(q2, p1, queue, own)) / 2
        everyone = distributed.gather(groups)
        self._enqueue(torch.cat([distributed.gather(k1), distributed.gather(k2)]), everyone.repeat(2))
        y = y1.detach()
        return loss, {"loss": loss.detach(), "embedding_std": monitors.embedding_std(y),
                      "effective_rank": monitors.effective_rank(y)}

    def _infonce(self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """Cross-entropy picking the key of the same utterance among it and the queued keys of
        other groups (`own` [B, K] marks the query's group in the queue)."""
        negatives = (q @ queue.T).masked_fill(own, float("-inf"))
        logits = torch.cat([(q * k).sum(dim=1, keepdim=True), negatives], dim=1)
        return F.cross_entropy(logits / self.cfg.temperature, torch.zeros_like(logits[:, 0], dtype=torch.long))

    def _keys(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Keys from the momentum branch. With several ranks, the batch is shuffled across them
        first so BatchNorm statistics cannot tell a query which key is its own (MoCo, sec. 3.3)."""
        branch = lambda vs: [self.momentum_projector(y) for y in encode_views(self.momentum_encoder, vs)]
        if not (self.cfg.shuffle_bn and distributed.is_dist()):
            return branch(views)
        n, b = distributed.world_size(), len(views[0])
        order = torch.randperm(n * b, device=views[0].device)
        dist.broadcast(order, src=0)
        mine = order.view(n, b)[distributed.rank()]
        keys = branch([distributed.gather(v)[mine] for v in views])
        where = torch.argsort(order).view(n, b)[distributed.rank()]
        return [distributed.gather(k)[where] for k in keys]

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor, groups: torch.Tensor) -> None:
        """Overwrite the oldest entries, wrapping around (any batch size works)."""
        keys, groups = keys[-len(self.queue):], groups[-len(self.queue):]
        idx = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % len(self.queue)
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_groups[idx] = groups
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % len(self.queue))

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        ema_update(self.momentum_encoder, self.encoder, self.cfg.momentum)
        ema_update(self.momentum_projector, self.projector, self.cfg.momentum)
