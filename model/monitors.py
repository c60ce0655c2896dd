"""Collapse monitors, returned by the methods as detached scalar stats."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of L2-normalised embeddings: 0 under collapse, about 1/sqrt(D)
    when the embeddings spread over the sphere (Chen & He 2021, SimSiam)."""
    return F.normalize(z.float(), dim=1).std(dim=0).mean()


@torch.no_grad()
def effective_rank(z: torch.Tensor) -> torch.Tensor:
    """exp(entropy of the normalised singular values) of a batch of embeddings (RankMe,
    Garrido et al. 2023): between 1 (collapse to a line) and min(B, D)."""
    z = z.float()
    finite = torch.isfinite(z).all()  # svdvals raises on inf/nan: NaN instead, the trainer's check stops
    s = torch.linalg.svdvals(torch.where(finite, z, torch.zeros_like(z)))
    p = s / s.sum() + 1e-7
    return torch.where(finite, torch.exp(-(p * p.log()).sum()), torch.full_like(s[0], float("nan")))


@torch.no_grad()
def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of rows of probabilities: DINO's teacher collapses to 0 (one prototype
    wins) or to log(K) (uniform output)."""
    return -(probs * torch.log(probs + 1e-7)).sum(dim=-1).mean()


@torch.no_grad()
def kl_divergence(probs: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Mean KL(p || q) of rows: how far the student's prediction is from the teacher's target."""
    return (probs * (torch.log(probs + 1e-7) - log_q)).sum(dim=-1).mean()
