"""AAM-softmax: the loss against a direct formula, the margin schedule, classes from groups."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from voxstream.model.methods.aam import Config, aam_logits, margin_at


def direct_loss(x, weight, labels, margin, scale) -> torch.Tensor:
    """Cross-entropy of scale * cos(theta + m) on the target and scale * cos(theta) elsewhere, by angles."""
    total = 0.0
    for xi, yi in zip(x, labels):
        angles = [math.acos(max(-1.0, min(1.0, float(F.cosine_similarity(xi, w, dim=0))))) for w in weight]
        logits = [scale * math.cos(a + (margin if j == yi else 0.0)) for j, a in enumerate(angles)]
        total += -logits[yi] + math.log(sum(math.exp(v) for v in logits))
    return torch.tensor(total / len(x))


def test_loss_matches_the_angle_formula():
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(12, 8, generator=g), torch.randn(5, 8, generator=g)
    labels = torch.randint(0, 5, (12,), generator=g)
    for margin in (0.0, 0.2, 0.5):
        loss = F.cross_entropy(aam_logits(x, weight, labels, margin, 30.0), labels)
        assert loss.item() == pytest.approx(direct_loss(x, weight, labels, margin, 30.0).item(), rel=1e-4)


def test_past_pi_the_target_logit_keeps_falling():
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    angles = torch.linspace(2.8, math.pi - 1e-3, 20)  # theta + 0.5 > pi: cos(theta + m) would rise again
    x = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    target = aam_logits(x, weight, torch.zeros(20, dtype=torch.long), 0.5, 1.0)[:, 0]
    assert torch.all(target[1:] < target[:-1])


def test_margin_grows_on_wespeakers_ramp():
    cfg = Config(classes=4, margin=0.2, margin_start=0.1, margin_end=0.3)
    assert margin_at(0.0, cfg) == margin_at(0.1, cfg) == 0.0
    assert margin_at(0.3, cfg) == margin_at(1.0, cfg) == 0.2
    assert margin_at(0.2, cfg) == pytest.approx(0.2 * (1 - 0.001 ** 0.5))
    assert all(margin_at(p / 100, cfg) <= margin_at((p + 1) / 100, cfg) for p in range(100))
