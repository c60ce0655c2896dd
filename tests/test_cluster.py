"""Clustering into pseudo-speakers: planted clusters recovered in one process and across 2 gloo ranks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score
from torch.nn import functional as F

from ranks import run_ranks
from voxstream.model.cluster import ahc, assign, nmi, purity, spherical_kmeans


def planted(speakers: int = 20, per_speaker: int = 40, dim: int = 32, spread: float = 0.35, seed: int = 0):
    """(unit points [N, dim], speaker of each): points scattered around random speaker directions."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(speakers, dim, generator=g), dim=1)
    truth = torch.arange(speakers).repeat_interleave(per_speaker)
    points = centres[truth] + spread * torch.randn(len(truth), dim, generator=g) / dim ** 0.5
    order = torch.randperm(len(truth), generator=g)
    return F.normalize(points[order], dim=1), truth[order].numpy()


def pseudo_labels(x: torch.Tensor, k: int, speakers: int) -> np.ndarray:
    centroids, labels = spherical_kmeans(x, k, seed=1)
    return ahc(centroids, speakers)[labels.numpy()]


def test_kmeans_then_ahc_recover_planted_speakers():
    x, truth = planted()
    labels = pseudo_labels(x, k=60, speakers=20)
    assert len(np.unique(labels)) == 20
    assert purity(labels, truth) >= 0.95
    assert nmi(labels, truth) >= 0.95


def test_kmeans_alone_over_segments_but_stays_pure():
    x, truth = planted()
    centroids, labels = spherical_kmeans(x, 60, seed=1)
    assert torch.allclose(centroids.norm(dim=1), torch.ones(60))
    assert len(labels.unique()) == 60  # no centroid left empty
    assert purity(labels.numpy(), truth) >= 0.95
    assert torch.equal(labels, assign(x, centroids)[0])


def test_empty_clusters_are_reseeded():
    """Seed 1 starts two centroids on copies of one point: the second loses every tie and stays
    empty for good unless it is re-seeded (with the point the clustering serves worst)."""
    g = torch.Generator().manual_seed(0)
    spread = F.normalize(torch.tensor([0.0, 1.0, 0.0]) + 0.3 * torch.randn(5, 3, generator=g), dim=1)
    x = torch.cat([torch.tensor([[1.0, 0.0, 0.0]] * 5), spread])
    centroids, labels = spherical_kmeans(x, 3, iterations=3, seed=1)
    assert len(labels.unique()) == 3


def test_scores_match_their_definitions():
    rng = np.random.default_rng(0)
    labels, reference = rng.integers(0, 7, 500), rng.integers(0, 5, 500)
    assert nmi(labels, reference) == pytest.approx(normalized_mutual_info_score(reference, labels))
    direct = sum(np.bincount(reference[labels == c]).max() for c in np.unique(labels)) / 500
    assert purity(labels, reference) == pytest.approx(direct)
    assert purity(reference, reference) == nmi(reference, reference) == 1.0


def test_bad_counts_are_errors():
    x, _ = planted(speakers=2, per_speaker=3)
    with pytest.raises(ValueError, match="7 clusters for 6 points"):
        spherical_kmeans(x, 7)
    with pytest.raises(ValueError, match="AHC: 3 clusters from 2 centroids"):
        ahc(x[:2], 3)


PRIORITY = torch.rand(800, generator=torch.Generator().manual_seed(3))  # one per point, wherever it is


def _cluster_a_share(rank: int, world: int) -> dict:
    x, _ = planted()
    share = slice(0, 500) if rank == 0 else slice(500, None)  # unequal shares
    centroids, labels = spherical_kmeans(x[share], 60, priority=PRIORITY[share])
    return {"centroids": centroids, "labels": labels}


def test_two_ranks_find_the_clusters_of_all_their_points():
    ranks = run_ranks(_cluster_a_share)
    assert torch.equal(ranks[0]["centroids"], ranks[1]["centroids"])
    x, truth = planted()
    centroids, labels = spherical_kmeans(x, 60, priority=PRIORITY)  # one process over every point
    assert torch.allclose(ranks[0]["centroids"], centroids, atol=1e-5)
    both = torch.cat([r["labels"] for r in ranks])
    assert (both == labels).float().mean() > 0.99
    merged = ahc(ranks[0]["centroids"], 20)[both.numpy()]
    assert purity(merged, truth) >= 0.95
