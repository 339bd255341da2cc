"""Who this process is and how it works with the others: process groups and collectives, the
Parallel seam that wraps the model (single device, DDP), peers' failures, SLURM, signals,
per-rank seeding and OpenMP threads. Imported before torch (see trainer/__init__.py): no torch here."""
