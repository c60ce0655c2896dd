"""Scoring arithmetic: EER and minDCF against independent computations, AS-norm against a direct loop,
speaker statistics against all pairs."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import brentq
from sklearn.metrics import roc_curve

from voxstream.model import metrics, scoring
from voxstream.model.evaluate import speaker_similarity


def _random_trials(seed: int, tied: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(2000) < 0.2
    scores = rng.normal(size=labels.size) + 1.5 * labels
    return (np.round(scores, 1) if tied else scores), labels.astype(int)


def _sklearn_eer(scores: np.ndarray, labels: np.ndarray) -> float:
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return brentq(lambda x: 1.0 - x - np.interp(x, fpr, tpr), 0.0, 1.0)


def _sweep_min_dcf(scores: np.ndarray, labels: np.ndarray, p: float) -> float:
    target, non = scores[labels == 1], scores[labels == 0]
    best = np.inf
    for threshold in np.r_[np.unique(scores), np.inf]:
        frr, far = np.mean(target < threshold), np.mean(non >= threshold)
        best = min(best, p * frr + (1 - p) * far)
    return best / min(p, 1 - p)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eer_and_min_dcf_agree_with_independent_computations(seed, tied):
    scores, labels = _random_trials(seed, tied)
    if tied:
        assert len(np.unique(scores)) < len(scores) / 10   # many ties, mixing targets and non-targets
    assert metrics.eer(scores, labels) == pytest.approx(_sklearn_eer(scores, labels), abs=1e-9)
    for p in (0.01, 0.05):
        assert metrics.min_dcf(scores, labels, p) == pytest.approx(_sweep_min_dcf(scores, labels, p), abs=1e-12)


def test_metrics_edge_cases():
    labels = np.array([1, 1, 0, 0])
    assert metrics.eer(np.array([0.9, 0.8, 0.1, 0.2]), labels) == 0.0
    assert metrics.eer(np.full(4, 0.5), labels) == 0.5
    with pytest.raises(ValueError, match="both target and non-target"):
        metrics.eer(np.array([0.1, 0.2]), np.array([1, 1]))
    with pytest.raises(ValueError, match="NaN"):
        metrics.eer(np.array([np.nan, 0.2, 0.3, 0.4]), labels)


# ---------------------------------------------------------------- scoring

def test_as_norm_with_mean_subtraction_matches_a_direct_loop():
    rng = np.random.default_rng(0)
    emb, cohort, mean = rng.normal(size=(30, 8)), rng.normal(size=(50, 8)), rng.normal(size=8) * 0.3
    enroll, test = rng.integers(0, 30, 200), rng.integers(0, 30, 200)
    top_n = 10

    x = scoring.prepare(emb, mean)
    raw = scoring.cosine(x, enroll, test)
    got = scoring.as_norm(raw, enroll, test, *scoring.cohort_stats(x, scoring.prepare(cohort, mean), top_n))

    def unit(v):
        return (v - mean) / np.linalg.norm(v - mean)

    for k, (e, t) in enumerate(zip(enroll, test)):
        s = unit(emb[e]) @ unit(emb[t])
        assert raw[k] == pytest.approx(s, abs=1e-12)
        side = []
        for u in (emb[e], emb[t]):
            top = np.sort([unit(u) @ unit(c) for c in cohort])[::-1][:top_n]
            side.append((s - top.mean()) / top.std())
        assert got[k] == pytest.approx(0.5 * sum(side), abs=1e-9)


def test_speaker_similarity_matches_all_pairs():
    rng = np.random.default_rng(1)
    ids = [f"spk{k % 4}/s/{k}.wav" for k in range(13)]
    x = scoring.prepare(rng.normal(size=(13, 5)) + 0.5)
    intra, inter = [], []
    for i in range(13):
        for j in range(13):
            if i != j:
                (intra if ids[i][:4] == ids[j][:4] else inter).append(x[i] @ x[j])
    stats = speaker_similarity(ids, x)
    assert stats["speakers"] == 4
    assert stats["intra_cosine"] == pytest.approx(np.mean(intra), abs=1e-4)
    assert stats["inter_cosine"] == pytest.approx(np.mean(inter), abs=1e-4)
    assert speaker_similarity(["a.wav", "b.wav"], x[:2]) is None
