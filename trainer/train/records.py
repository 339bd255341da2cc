"""The run's record: optimizer steps done, one record of metrics per epoch, the best value of
``ckpt.metric``, and what each epoch writes to the log."""

from __future__ import annotations

from typing import Any

from trainer.train.early_stop import early_stop_reason


class RunRecord:
    """Kept in every checkpoint (as its ``worker`` piece), so a resumed run reports, chooses
    ``best.pt`` and stops early as the uninterrupted one would."""

    def __init__(self, metric: str, mode: str) -> None:
        self.metric, self.mode = metric, mode
        self.global_step = 0
        self.best: float | None = None
        self.history: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any]) -> bool:
        """Append one epoch's record; whether it is the best so far by ``ckpt.metric``."""
        value = record[self.metric]  # config.check_metric checked that it is logged
        improved = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if improved:
            self.best = value
        self.history.append(record)
        return improved

    def early_stop(self, patience: int, min_delta: float) -> str | None:
        return early_stop_reason(self.history, self.metric, self.mode, patience, min_delta)

    def state_dict(self) -> dict[str, Any]:
        return {"global_step": self.global_step, "best": self.best, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_step, self.best, self.history = state["global_step"], state["best"], state["history"]


def epoch_record(epoch: int, step: int, train: dict[str, float], val: dict[str, float],
                 val_ema: dict[str, float] | None, **extra: float) -> dict[str, Any]:
    """One epoch's metrics as ``train/...``, ``val/...`` and ``val_ema/...`` keys."""
    record: dict[str, Any] = {"epoch": epoch, "step": step}
    record.update({f"train/{k}": v for k, v in train.items()})
    record.update({f"val/{k}": v for k, v in val.items()})
    record.update({f"val_ema/{k}": v for k, v in (val_ema or {}).items()})
    record.update({f"train/{k}": v for k, v in extra.items()})
    return record


def epoch_line(record: dict[str, Any], epochs: int, validation: str) -> str:
    """The epoch's log line; ``validation`` is the task's summary of its metrics."""
    return (f"epoch {record['epoch']}/{epochs}  train loss {record['train/loss']:.4f} | {validation} | "
            f"lr {record['train/lr']:.3g} | {record['train/images_per_s']:.0f} img/s | "
            f"data wait {100 * record['train/data_wait']:.0f}% | peak mem {record['train/peak_mem_mb']:.0f} MB")
