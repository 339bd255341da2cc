"""Training: the Worker's loop (orchestration only), the step (precision, scaler, accumulation,
clipping), optimizers, schedules, EMA, meters, evaluation and early stopping."""
