"""Exact multi-label metrics from every sample's scores at once (torch only, float64).

The caller gathers all ranks' scores and targets, in an order that depends on the sharding, so
each result is a function of the set of (score, target) rows: tied scores are one threshold, and
every sum runs over tensors that no reordering of the rows changes, bit for bit.
"""

from __future__ import annotations

import torch


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, C) scores, (N, C) {0,1} targets -> (C,) float64 AP per class; NaN for a class with no positive.

    AP as scikit-learn's ``average_precision_score``: the sum over distinct thresholds, highest
    first, of (R_n - R_{n-1}) * P_n, a run of tied scores being one threshold.
    """
    _check(scores, targets)
    scores, targets = scores.double(), targets.double()
    order = scores.argsort(dim=0, descending=True)
    ranked = scores.gather(0, order)
    hits = targets.gather(0, order).cumsum(0)  # true positives among the first k+1 rows
    last = torch.ones_like(ranked, dtype=torch.bool)  # the last row of each run of tied scores
    last[:-1] = ranked[:-1] != ranked[1:]
    at_last = torch.where(last, hits, 0.0)  # tie order moves hits inside a run, not at its end
    before = torch.cat([torch.zeros_like(at_last[:1]), at_last.cummax(0).values[:-1]])
    gained = torch.where(last, hits - before, 0.0)  # new true positives at each threshold
    kept = torch.arange(1, len(ranked) + 1, dtype=torch.float64, device=ranked.device).unsqueeze(1)
    return (gained * (at_last / kept)).sum(0) / targets.sum(0)


def f1_at(scores: torch.Tensor, targets: torch.Tensor, threshold: float) -> dict[str, float]:
    """Micro precision/recall/F1 and macro F1 of predictions scores >= threshold (scores are probabilities).

    Keys as ``trainer.config.TASK_METRICS["multilabel"]``: ``precision``, ``recall``, ``f1``,
    ``f1_macro``. An undefined ratio (nothing predicted, say) is 0, and the macro F1 averages
    the classes seen as a target or a prediction, as the classification confusion does.
    """
    _check(scores, targets)
    predicted, actual = scores >= threshold, targets.bool()
    tp = (predicted & actual).sum(0).double()
    fp = (predicted & ~actual).sum(0).double()
    fn = (~predicted & actual).sum(0).double()
    seen = tp + fp + fn > 0
    per_class = 2 * tp[seen] / (2 * tp[seen] + fp[seen] + fn[seen])
    tp, fp, fn = tp.sum().item(), fp.sum().item(), fn.sum().item()
    return {"precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn), "f1_macro": per_class.mean().item() if seen.any() else 0.0}


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def _check(scores: torch.Tensor, targets: torch.Tensor) -> None:
    if scores.dim() != 2 or scores.shape != targets.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)} must both be (N, C)")
