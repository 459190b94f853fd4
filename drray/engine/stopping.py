"""Early stopping on a validation metric, as a pure function of the metric's history."""

from __future__ import annotations

from collections.abc import Sequence


def should_stop(history: Sequence[float | None], patience: int, min_delta: float = 0.0) -> bool:
    """True when the last ``patience`` epochs did not improve the best value so far by more than
    ``min_delta`` (Keras' rule: the best moves only on such an improvement). An epoch without a
    value (a validation set with one class) counts as no improvement."""
    if patience < 1:
        raise ValueError(f"patience must be at least 1, got {patience}")
    best, since = float("-inf"), 0
    for value in history:
        if value is not None and value > best + min_delta:
            best, since = value, 0
        else:
            since += 1
    return since >= patience
