"""The built-in tasks and the metrics each validation logs (``val/<name>``), first the one a run
is judged by: light (no torch), so that the config checks ``ckpt.metric`` before anything is built."""

METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("top1", "loss", "top5", "precision", "recall", "f1"),
    "multilabel": ("map", "loss", "f1", "precision", "recall", "f1_macro"),
}
"""Validation metrics per built-in task; the first is the default ``ckpt.metric`` (``auto``)."""
