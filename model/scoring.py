"""Trial scoring: cosine similarity, optional mean subtraction, adaptive symmetric score normalisation.

Embeddings live in one matrix with a row per utterance; a trial list is two arrays of row indices
(enroll, test). Everything is chunked so that the largest lists (VoxCeleb1-H: 550k trials) and
large cohorts stay within a bounded amount of memory.
"""
from __future__ import annotations

import numpy as np

CHUNK = 8192


def prepare(emb: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """Subtract the training-set mean (when given), then length-normalise, in float64."""
    x = np.asarray(emb, dtype=np.float64)
    if mean is not None:
        x = x - mean
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosine(x: np.ndarray, enroll: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Cosine score of each trial; `x` is already prepared (unit rows)."""
    scores = np.empty(len(enroll))
    for i in range(0, len(enroll), CHUNK):
        e, t = enroll[i:i + CHUNK], test[i:i + CHUNK]
        scores[i:i + CHUNK] = np.einsum("nd,nd->n", x[e], x[t])
    return scores


def cohort_stats(x: np.ndarray, cohort: np.ndarray, top_n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each row's `top_n` highest cosine scores against the cohort.

    Computed once per utterance rather than once per trial: an utterance appears in many trials.
    """
    top_n = min(top_n, len(cohort))
    mu, sd = np.empty(len(x)), np.empty(len(x))
    for i in range(0, len(x), CHUNK):
        s = x[i:i + CHUNK] @ cohort.T
        top = np.partition(s, s.shape[1] - top_n, axis=1)[:, -top_n:]
        mu[i:i + CHUNK], sd[i:i + CHUNK] = top.mean(axis=1), top.std(axis=1)
    return mu, np.maximum(sd, 1e-12)


def as_norm(scores: np.ndarray, enroll: np.ndarray, test: np.ndarray,
            mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """AS-norm (Matejka et al., 2017): the average of the score z-normalised by each side's top cohort."""
    return 0.5 * ((scores - mu[enroll]) / sd[enroll] + (scores - mu[test]) / sd[test])
