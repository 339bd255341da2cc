"""What a run shows: the console and progress bar, rank-0 metric sinks and trackers (TensorBoard,
JSON lines, wandb, MLflow), pictures, the profiler and peak memory."""
