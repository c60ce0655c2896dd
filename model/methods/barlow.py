"""Barlow Twins (Zbontar et al., ICML 2021): redundancy reduction between two views.

The cross-correlation matrix of the two views' batch-standardised projections is driven to the
identity: diagonal to 1 (invariance), off-diagonal to 0 (decorrelation), weighted by lambda.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from voxstream.model.distributed import all_reduce_sum
from voxstream.model.methods.base import MethodConfig, SSLMethod
from voxstream.model.methods.parts import encode_views, mlp
from voxstream.model.monitors import effective_rank, embedding_std


@dataclass
class Config(MethodConfig):
    name: str = "barlow"
    # lambda, the off-diagonal weight: 0.005 in sslsv (BarlowTwinsConfig.lamda and the VoxCeleb2
    # recipe barlowtwins_proj-2048-BN-R-2048-BN-R-512_lambda-0.005); 0.0051 in the paper's code.
    off_diagonal_weight: float = 0.005
    # Loss scale 0.025: sslsv BarlowTwinsLoss(scale=0.025), the role the reference code's early
    # `--scale-loss 1/32` played; it sizes the gradient for sslsv's Adam learning rate.
    scale: float = 0.025
    # Projector 2048-BN-R-2048-BN-R-512: sslsv VoxCeleb2 recipe (paper: 8192 x 3 on ImageNet).
    projector_hidden_dim: int = 2048
    projector_output_dim: int = 512


def standardise(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-dimension (z - mean) / std over the global batch: BatchNorm1d(affine=False) in training
    mode, synchronised across ranks like the reference code's SyncBatchNorm."""
    n = all_reduce_sum(z.new_full((), float(len(z))))
    mean = all_reduce_sum(z.sum(dim=0)) / n
    var = all_reduce_sum((z - mean).pow(2).sum(dim=0)) / n  # biased, as BatchNorm normalises
    return (z - mean) / torch.sqrt(var + eps)


def cross_correlation(za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
    """[D, D] cross-correlation of two views over the global batch.

    Each rank adds its samples' share of sum_n za_n zb_n^T and the all-reduce (with autograd) sums
    the shares, so it equals the single-process matrix over the concatenated batch.
    """
    n = all_reduce_sum(za.new_full((), float(len(za))))
    return all_reduce_sum(standardise(za).T @ standardise(zb)) / n


def barlow_terms(c: torch.Tensor) -> dict[str, torch.Tensor]:
    """Unweighted on-diagonal sum (c_ii - 1)^2 and off-diagonal sum c_ij^2 of a correlation matrix."""
    diagonal = c.diagonal()
    return {"on_diagonal": (diagonal - 1).pow(2).sum(),
            "off_diagonal": c.pow(2).sum() - diagonal.pow(2).sum()}


class BarlowTwins(SSLMethod):
    Config = Config

    def __init__(self, encoder: torch.nn.Module, cfg: Config, embed_dim: int):
        super().__init__(encoder, cfg, embed_dim)
        self.projector = mlp([embed_dim, cfg.projector_hidden_dim, cfg.projector_hidden_dim,
                              cfg.projector_output_dim])

    def forward(self, views: list[torch.Tensor], groups: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # no negatives: groups unused
        self.check_views(views)
        ya, yb = encode_views(self.encoder, views)
        za, zb = self.projector(ya).float(), self.projector(yb).float()
        with torch.autocast(za.device.type, enabled=False):  # a D x D correlation loses too much in bf16
            terms = barlow_terms(cross_correlation(za, zb))
        loss = self.cfg.scale * (terms["on_diagonal"] + self.cfg.off_diagonal_weight * terms["off_diagonal"])
        stats = {k: v.detach() for k, v in terms.items()}
        stats.update(loss=loss.detach(), embedding_std=embedding_std(ya.detach()),
                     effective_rank=effective_rank(ya.detach()))
        return loss, stats
