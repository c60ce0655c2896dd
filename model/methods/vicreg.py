"""VICReg (Bardes, Ponce & LeCun, ICLR 2022): variance-invariance-covariance regularisation.

Two views go through the encoder and an expander MLP. The loss pulls each pair of expanded
embeddings together (invariance), keeps every dimension's std above 1 across the batch (variance)
and decorrelates the dimensions (covariance). No negatives, no momentum branch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from voxstream.model.distributed import gather_with_grad
from voxstream.model.methods.base import MethodConfig, SSLMethod
from voxstream.model.methods.parts import encode_views, mlp
from voxstream.model.monitors import effective_rank, embedding_std


@dataclass
class Config(MethodConfig):
    name: str = "vicreg"
    # Loss weights lambda / mu / nu = 25 / 25 / 1: VICReg paper (Sec. 4.1) and its reference code.
    # sslsv (Lepage & Dehak) writes 1 / 1 / 0.04, the same ratios scaled by 1/25 (it does not
    # halve the variance term); its VoxCeleb2 sweep also tried nu = 0.1 (x25 = 2.5 here).
    inv_weight: float = 25.0
    var_weight: float = 25.0
    cov_weight: float = 1.0
    # Expander 2048-BN-R-2048-BN-R-512: sslsv VoxCeleb2 recipe
    # models/ssl/voxceleb2/vicreg/vicreg_proj-2048-BN-R-2048-BN-R-512_*; the paper's 8192 x 3 is for
    # ImageNet.
    projector_hidden_dim: int = 2048
    projector_output_dim: int = 512


def vicreg_terms(za: torch.Tensor, zb: torch.Tensor) -> dict[str, torch.Tensor]:
    """Unweighted invariance, variance and covariance terms of two [N, D] batches, with the
    reference code's formulas (unbiased std with eps 1e-4, covariance divided by D)."""
    return {
        "invariance": F.mse_loss(za, zb),
        "variance": (_variance_hinge(za) + _variance_hinge(zb)) / 2,
        "covariance": _off_diagonal_power(za) + _off_diagonal_power(zb),
    }


def _variance_hinge(z: torch.Tensor) -> torch.Tensor:
    std = torch.sqrt(z.var(dim=0) + 1e-4)  # eps keeps the gradient finite at std = 0 (collapse)
    return F.relu(1 - std).mean()


def _off_diagonal_power(z: torch.Tensor) -> torch.Tensor:
    cov = torch.cov(z.T)  # [D, D], unbiased, over the batch
    return (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / z.shape[1]


class VICReg(SSLMethod):
    Config = Config

    def __init__(self, encoder: torch.nn.Module, cfg: Config, embed_dim: int):
        super().__init__(encoder, cfg, embed_dim)
        self.expander = mlp([embed_dim, cfg.projector_hidden_dim, cfg.projector_hidden_dim,
                             cfg.projector_output_dim])

    def forward(self, views: list[torch.Tensor], groups: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # no negatives: groups unused
        self.check_views(views)
        ya, yb = encode_views(self.encoder, views)
        # Every term is computed on the batch gathered across ranks (as the reference code's
        # FullGatherLayer does): std and covariance are batch statistics, and a per-rank batch
        # (say 32 samples for a 512 x 512 covariance) would make them noisy and rank-deficient.
        # The invariance term is a per-sample mean, so gathering it changes nothing but makes the
        # loss identical on every rank: the loss of the global batch.
        za, zb = self.expander(ya).float(), self.expander(yb).float()
        with torch.autocast(za.device.type, enabled=False):  # D x D statistics lose too much in bf16
            terms = vicreg_terms(gather_with_grad(za), gather_with_grad(zb))
        cfg = self.cfg
        loss = (cfg.inv_weight * terms["invariance"] + cfg.var_weight * terms["variance"]
                + cfg.cov_weight * terms["covariance"])
        stats = {k: v.detach() for k, v in terms.items()}
        stats.update(loss=loss.detach(), embedding_std=embedding_std(ya.detach()),
                     effective_rank=effective_rank(ya.detach()))
        return loss, stats
