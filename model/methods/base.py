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
    - `forward` first calls `check_views`: a method takes the number of views `view_counts()`
      declares, and any other number is an error (a view is never silently dropped).
    - `after_step(step, total_steps)` runs after optimizer step `step` (0-based) of `total_steps`:
      momentum/EMA updates and schedules (e.g. DINO's teacher temperature, SwAV's prototype
      freeze). Schedules are fractions of training, never step counts of one dataset.
    - Nothing in a training step reads a device tensor on the host (.item(), float(), int(),
      `if tensor`): that would wait for the device at every step. What a schedule decides from is a
      Python number, set in `after_step`; a buffer keeps a copy for the state dict, and
      `restore_host_state` reads it back once, whenever a state dict is loaded.
    - SSPS (model/ssps.py): a method with a positive branch sets `SAMPLES_POSITIVES` and takes
      `forward(views, groups, positives)`; it passes each positive-branch output through
      `positives.swap`, which substitutes the sampled positives (and keeps the outputs for the queue).
    - `embedder()` is the network used for evaluation (the teacher for DINO, the encoder otherwise).
    - State that must survive a resume (queues, centers, progress) lives in buffers, so
      `state_dict()` is the whole method state.
    """

    Config = MethodConfig
    SAMPLES_POSITIVES = False  # takes SSPS positives in forward (model/ssps.py)

    def __init__(self, encoder: nn.Module, cfg: MethodConfig, embed_dim: int):
        super().__init__()
        self.encoder = encoder
        self.cfg = cfg
        self.embed_dim = embed_dim
        self.register_load_state_dict_post_hook(_restore_host_state)

    @abc.abstractmethod
    def forward(self, views: list[torch.Tensor], groups: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scalar loss, detached scalar stats) for a list of [B, T_v] waveform views."""

    def view_counts(self) -> tuple[int, int | None]:
        """(fewest, most) views `forward` takes; most None: no limit. Default: one pair."""
        return 2, 2

    def check_views(self, views: list[torch.Tensor]) -> None:
        fewest, most = self.view_counts()
        if fewest <= len(views) and (most is None or len(views) <= most):
            return
        need = f"{fewest}" if fewest == most else f"at least {fewest}" if most is None else f"{fewest} to {most}"
        raise ValueError(f"{self.cfg.name} takes {need} views (data.views), got {len(views)}")

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """Default: nothing to update."""

    def restore_host_state(self) -> None:
        """Default: no host copies of buffers."""

    def embedder(self) -> nn.Module:
        return self.encoder


def _restore_host_state(method: SSLMethod, incompatible_keys) -> None:
    """load_state_dict's post-hook (a module-level function, so a method still pickles)."""
    method.restore_host_state()
