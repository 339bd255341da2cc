"""``task.name``: a built-in task, or the user's builder named by import path."""

from __future__ import annotations

from trainer.config import Config, check_metric
from trainer.config import user_code
from trainer.errors import ConfigError
from trainer.tasks.base import Task
from trainer.tasks.classification import Classification
from trainer.tasks.multilabel import MultiLabel

REQUIRED = ("target_form", "metrics", "loss", "meter", "stand_in_targets", "probabilities", "caption", "summary",
            "evidence")
"""What a user's task must have (see trainer.tasks.base.Task; subclass Classification to start from it)."""


def build_task(cfg: Config) -> Task:
    """The task of the run; a user's is called with the config and checked against :data:`REQUIRED`,
    and its metrics settle ``ckpt.metric``."""
    name = cfg.task.name
    if name == "classification":
        return Classification(cfg.train.label_smoothing, "bce" if cfg.task.loss == "bce" else "ce",
                              cfg.task.bce_target_threshold)
    if name == "multilabel":
        return MultiLabel(cfg.task.threshold, cfg.task.bce_target_threshold)
    task = user_code.load_callable(name, "task.name")(cfg)
    missing = [attribute for attribute in REQUIRED if not hasattr(task, attribute)]
    if missing:
        raise ConfigError(f"task.name: {name} returned an instance of {type(task).__name__} without "
                          f"{', '.join(missing)}; subclass trainer.tasks.classification.Classification or see "
                          "trainer/tasks/base.py")
    check_metric(cfg, task.metrics)
    return task
