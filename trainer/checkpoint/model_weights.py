"""The model weights inside a checkpoint, for evaluation, prediction and export: the classes it
was trained on, the plain or EMA weights, and a strict load that names every mismatch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trainer.errors import CheckpointError


def check_classes(state: dict[str, Any], classes: list[str], origin: Path) -> None:
    """Refuse a checkpoint trained on other classes than the data set's."""
    if state.get("classes") != classes:
        raise CheckpointError(f"{origin} was trained on classes {state.get('classes')}, "
                              f"but the data has {classes}; check data.source and data.root")


WEIGHTS = ("auto", "model", "ema")
"""Which weights of a checkpoint to use for evaluation and prediction (``--weights``)."""


def select_weights(state: dict[str, Any], which: str, origin: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """The checkpoint's model weights or its EMA's, and which it was.

    ``auto`` takes the EMA when the run chose its best checkpoint on a ``val_ema/`` metric.
    """
    ema = (state.get("step") or {}).get("ema")
    if which == "auto":
        metric = (state.get("config") or {}).get("ckpt", {}).get("metric", "")
        which = "ema" if ema is not None and metric.startswith("val_ema/") else "model"
    if which == "ema":
        if ema is None:
            raise CheckpointError(f"{origin} holds no EMA weights (trained with train.ema_decay=0); "
                                  "use --weights model")
        return which, ema["model"]
    return which, state["model"]


def load_model_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], origin: Path) -> None:
    """Load weights strictly; on any mismatch, name the differing keys and shapes in one line."""
    mismatch = weight_mismatch(model, weights)
    if mismatch:
        raise CheckpointError(f"{origin} does not match the model ({mismatch}); "
                              "check model.name and the number of classes")
    model.load_state_dict(weights)


def weight_mismatch(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> str | None:
    """The missing, unexpected and differently shaped keys of ``weights``, or None if they fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(weights)) if weights[k].shape != own[k].shape]
    parts = [f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
             for label, items in (("missing", missing), ("unexpected", unexpected),
                                  ("shape checkpoint vs model", shapes)) if items]
    return "; ".join(parts) or None
