"""Evaluation figures: DET curves and score histograms, drawn with matplotlib's Agg canvas (no display)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import norm

from voxstream.model.metrics import error_rates

DET_TICKS = [0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8]
DET_LIMITS = (0.0005, 0.8)


def new_figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=120)
    FigureCanvasAgg(fig)   # without pyplot: no global figure state, no interactive backend
    return fig


def plot_det(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path: str | Path) -> None:
    """DET curves on normal-deviate axes; `curves` maps a label to (scores, labels, eer)."""
    fig = new_figure((5.5, 5.5))
    ax = fig.add_subplot()
    lo, hi = DET_LIMITS
    for name, (scores, labels, eer) in curves.items():
        frr, far, _ = error_rates(scores, labels)
        line, = ax.plot(norm.ppf(np.clip(far, lo, hi)), norm.ppf(np.clip(frr, lo, hi)),
                        label=f"{name} (EER {100 * eer:.2f}%)")
        ax.plot([norm.ppf(np.clip(eer, lo, hi))] * 2, [norm.ppf(np.clip(eer, lo, hi))] * 2,
                "o", color=line.get_color())
    ticks = norm.ppf(DET_TICKS)
    labels = [f"{100 * t:g}" for t in DET_TICKS]
    ax.set_xticks(ticks, labels)
    ax.set_yticks(ticks, labels)
    ax.set_xlim(norm.ppf(lo), norm.ppf(hi))
    ax.set_ylim(norm.ppf(lo), norm.ppf(hi))
    ax.plot(ax.get_xlim(), ax.get_ylim(), ":", color="grey", linewidth=0.8)   # FAR = FRR
    ax.set_xlabel("False acceptance rate (%)")
    ax.set_ylabel("False rejection rate (%)")
    ax.set_title("DET curve")
    ax.grid(True, linewidth=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def plot_histogram(scores: np.ndarray, labels: np.ndarray, path: str | Path, title: str,
                   threshold: float | None = None) -> None:
    """Target and non-target score distributions, with the EER threshold when given."""
    fig = new_figure((6.0, 4.0))
    ax = fig.add_subplot()
    labels = np.asarray(labels).astype(bool)
    bins = np.linspace(scores.min(), scores.max(), 61) if scores.max() > scores.min() else 10
    ax.hist(scores[~labels], bins=bins, density=True, alpha=0.55, label=f"non-target ({(~labels).sum()})")
    ax.hist(scores[labels], bins=bins, density=True, alpha=0.55, label=f"target ({labels.sum()})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=0.8, label="EER threshold")
    ax.set_xlabel("score")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
