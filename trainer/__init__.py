"""The Worker: one training process per device (see ``python -m trainer --help``)."""

import time

from trainer.parallel import openmp

STARTED = time.monotonic()
"""When this process imported the trainer: start-up times in the log count from here."""

# OpenMP threads that spin while they wait slow CPU training several-fold when the ranks' threads
# outnumber the cores, yet sleeping ones slow a single process next to its DataLoader workers:
# choose per run (trainer/parallel/openmp.py). Must precede `import torch`.
openmp.apply_wait_policy()
