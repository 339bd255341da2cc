"""The Worker: one training process per device (see ``python -m trainer --help``)."""

import os

# OpenMP threads that spin while they wait slow CPU training several-fold as soon as anything else
# (DataLoader workers, other ranks) shares the cores; let them sleep instead. Must precede `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
