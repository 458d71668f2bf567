"""Schedules of the training loops (SPEC.md sections 3 and 4)."""

from __future__ import annotations

import math


def cosine(step: int, start: float, end: float, steps: int) -> float:
    """Cosine from `start` at step 0 to `end` at `steps`, then held at `end`."""
    if steps <= 0:
        return end
    t = min(max(step, 0), steps) / steps
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_cosine(step: int, peak: float, end: float, warmup: int, steps: int) -> float:
    """Linear warm-up from 0 to `peak` over `warmup` steps, then cosine down to `end` at `steps`."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    return cosine(step - warmup, peak, end, steps - warmup)
