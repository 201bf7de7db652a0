"""Coefficient schedules over training epochs (pure functions)."""

from __future__ import annotations


def linear_ramp(epoch: int, *, start: float, end: float | None, ramp_epochs: int) -> float:
    """Linear ramp from ``start`` at epoch 0 to ``end`` at ``ramp_epochs``, constant after (GARD §4.3).

    ``end=None`` or ``ramp_epochs=0`` means constant ``start``.
    """
    if end is None or ramp_epochs <= 0:
        return start
    frac = min(max(epoch, 0) / ramp_epochs, 1.0)
    return start + (end - start) * frac
