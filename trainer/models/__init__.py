"""Models: built by name or import path (torchvision, timm, the user's), pretrained weights,
what the trainer does to any module (its blocks, activation checkpointing), and FLOPs. The names
below are the package's public face."""

from trainer.models.blocks import checkpoint_activations, find_blocks
from trainer.models.catalog import (available, build_deferred, build_for_training, build_model, builds_deferred,
                                    check_weights, implied_settings, resolve_name, sketch)
from trainer.models.deferred import copy_values
from trainer.models.modules import (count_parameters, evaluation_mode, head_parameter_names, initialise,
                                    memory_format, unwrap)

__all__ = ["available", "build_deferred", "build_for_training", "build_model", "builds_deferred", "check_weights",
           "checkpoint_activations", "copy_values", "count_parameters", "evaluation_mode", "find_blocks",
           "head_parameter_names", "implied_settings", "initialise", "memory_format", "resolve_name", "sketch",
           "unwrap"]
