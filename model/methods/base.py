"""The one interface every SSL method implements: views in, loss and monitoring statistics out."""
from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class MethodConfig:
    """Fields shared by every method; each method's own Config subclasses this."""
    name: str = ""


class SSLMethod(nn.Module, abc.ABC):
    """Base class. Subclasses set `Config` and implement `forward`.

    - `encoder` maps waveforms [B, T] (float, on the device, already augmented) to embeddings [B, D];
      it includes the fbank front-end (model.features) so every branch sees the same input.
    - `forward(views, groups)` takes a list of [B, T_v] waveforms (the pipeline's views, in recipe
      order: global crops first for DINO) and returns (scalar loss, stats). Stats are detached scalar
      tensors (loss parts, collapse monitors from model.monitors) so the trainer can all-reduce them.
      `groups` (int64 [B], pipeline.loader.group_ids; None: every item its own group) names the
      items' sessions or pseudo-labels: methods that contrast against negatives (SimCLR, MoCo) leave
      items of the anchor's group out of them, because those are the same speaker.
    - `after_step(step, total_steps)` runs after the optimizer step: momentum/EMA updates,
      schedules that depend on progress (e.g. DINO teacher temperature and momentum).
    - `embedder()` is the network used for evaluation (the teacher for DINO, the encoder otherwise).
    - State that must survive a resume (queues, centers) lives in buffers, so `state_dict()` is
      the whole method state.
    """

    Config = MethodConfig

    def __init__(self, encoder: nn.Module, cfg: MethodConfig, embed_dim: int):
        super().__init__()
        self.encoder = encoder
        self.cfg = cfg
        self.embed_dim = embed_dim

    @abc.abstractmethod
    def forward(self, views: list[torch.Tensor], groups: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scalar loss, detached scalar stats) for a list of [B, T_v] waveform views."""

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """Default: nothing to update."""

    def embedder(self) -> nn.Module:
        return self.encoder
