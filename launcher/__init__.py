"""``python -m launcher``: inspect the machine, pick how to start the Worker, print the plan, run it."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see trainer/__init__.py; inherited by the workers
