"""Checkpoints: atomic files on disk, retention and fallback, the checkpoint as a dict of stateful
pieces, the weights inside one, and the run lock. The names below are the package's public face."""

from trainer.checkpoint.model_weights import WEIGHTS, check_classes, load_model_weights, select_weights, weight_mismatch
from trainer.checkpoint.pieces import FORMAT, RankSums, Stateful, capture, changes_since, describe_changes, restore
from trainer.checkpoint.store import (checkpoint_dir, latest, link_atomic, load, load_for_resume, prune,
                                      rewrite_lines, save_atomic, save_step, step_files)

__all__ = ["FORMAT", "WEIGHTS", "RankSums", "Stateful", "capture", "changes_since", "check_classes",
           "checkpoint_dir", "describe_changes", "latest", "link_atomic", "load", "load_for_resume",
           "load_model_weights", "prune", "restore", "rewrite_lines", "save_atomic", "save_step", "select_weights",
           "step_files", "weight_mismatch"]
