"""The run's configuration: the schema, loading (defaults < YAML < ``key=value``), the command
line, and user code named by import path. The names below are the package's public face."""

from trainer.config.loading import (check_metric, epoch_metrics, flatten, get, load, profile_range, schema_keys,
                                    to_dict, to_yaml, validate)
from trainer.config.schema import (CHOICES, DATA_SOURCES, OPEN_CHOICES, TASK_METRICS, TRACKERS, CheckpointConfig,
                                   Config, DataConfig, DistConfig, LogConfig, ModelConfig, OptimConfig, SchedConfig,
                                   TaskConfig, TrainConfig)

__all__ = ["CHOICES", "DATA_SOURCES", "OPEN_CHOICES", "TASK_METRICS", "TRACKERS", "CheckpointConfig", "Config",
           "DataConfig", "DistConfig", "LogConfig", "ModelConfig", "OptimConfig", "SchedConfig", "TaskConfig",
           "TrainConfig", "check_metric", "epoch_metrics", "flatten", "get", "load", "profile_range", "schema_keys",
           "to_dict", "to_yaml", "validate"]
