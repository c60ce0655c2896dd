"""Speaker-verification metrics: EER and minDCF from scores and 0/1 labels."""
from __future__ import annotations

import numpy as np


def error_rates(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-rejection and false-acceptance rates at every distinct threshold (ties handled together).

    Returns (frr, far, thresholds); accept when score >= threshold. The first point (threshold +inf)
    accepts nothing: FRR = 1, FAR = 0; the last accepts everything.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n_tar, n_non = labels.sum(), (~labels).sum()
    if n_tar == 0 or n_non == 0:
        raise ValueError("trials need both target and non-target pairs")
    if not np.isfinite(scores).all():   # NaN would sort arbitrarily and give a plausible-looking EER
        raise ValueError(f"{np.count_nonzero(~np.isfinite(scores))} scores are NaN or infinite")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]   # thresholds only between distinct scores
    tp = np.cumsum(y)[last_of_tie]
    fp = np.cumsum(~y)[last_of_tie]
    frr = np.r_[1.0, 1.0 - tp / n_tar]
    far = np.r_[0.0, fp / n_non]
    thresholds = np.r_[np.inf, s[last_of_tie]]
    return frr, far, thresholds


def eer(scores: np.ndarray, labels: np.ndarray) -> float:
    """Equal error rate, interpolated where the FRR and FAR curves cross."""
    frr, far, _ = error_rates(scores, labels)
    i = int(np.argmax(far >= frr))          # first point with FAR >= FRR (exists: last point has FRR=0)
    if i == 0:
        return float(frr[0] + far[0]) / 2
    # Linear interpolation between points i-1 and i of the (FAR, FRR) staircase.
    d0, d1 = frr[i - 1] - far[i - 1], frr[i] - far[i]
    t = d0 / (d0 - d1) if d0 != d1 else 0.5
    return float(far[i - 1] + t * (far[i] - far[i - 1]))


def eer_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The score threshold where FAR first reaches FRR: the EER operating point (accept score >= it)."""
    frr, far, thresholds = error_rates(scores, labels)
    return float(thresholds[int(np.argmax(far >= frr))])


def min_dcf(scores: np.ndarray, labels: np.ndarray, p_target: float = 0.01,
            c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    """Minimum normalised detection cost (NIST SRE definition)."""
    frr, far, _ = error_rates(scores, labels)
    dcf = c_miss * p_target * frr + c_fa * (1 - p_target) * far
    return float(dcf.min() / min(c_miss * p_target, c_fa * (1 - p_target)))
