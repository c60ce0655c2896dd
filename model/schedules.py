"""Learning-rate and weight-decay schedules: pure functions of the step, so a resume needs only the step."""
from __future__ import annotations

import math


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Half-cosine from `start` at step 0 to `end` at step `total` (held at `end` after)."""
    if total <= 0:
        return end
    progress = min(step, total) / total
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(step: int, total: int, warmup: int, peak: float, final: float) -> float:
    """Linear warm-up from ~0 to `peak` over `warmup` steps, then cosine down to `final` (DINO, SimCLR)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return cosine(step - warmup, total - warmup, peak, final)
