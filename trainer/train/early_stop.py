"""Early stopping: a pure function of the epoch history, so a resumed run decides the same way."""

from __future__ import annotations

from typing import Any


def early_stop_reason(history: list[dict[str, Any]], metric: str, mode: str, patience: int,
                      min_delta: float) -> str | None:
    """Why to stop now: ``metric`` has not improved by more than ``min_delta`` over its best for
    ``patience`` epochs; None to go on (or when ``patience`` is 0).

    An epoch counts as an improvement only when it beats the best so far by more than
    ``min_delta`` (``mode`` max: higher is better; min: lower is better).
    """
    values = [record[metric] for record in history if metric in record]
    if patience <= 0 or not values:
        return None
    best, best_epoch, stale = values[0], 1, 0
    for epoch, value in enumerate(values[1:], start=2):
        if (value - best if mode == "max" else best - value) > min_delta:
            best, best_epoch, stale = value, epoch, 0
        else:
            stale += 1
    if stale < patience:
        return None
    return (f"{metric} has not improved by more than {min_delta:g} for {stale} epochs "
            f"(best {best:.4f} at epoch {best_epoch}, train.early_stop_patience={patience})")
