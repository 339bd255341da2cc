"""The real trainer, except that rank 1 raises after its FAIL_AFTER_STEPS-th training step.

Used by tests/test_distributed.py to check that an exception on one rank ends the whole job
quickly (well before the process-group timeout) with that rank's traceback in the output, under
torchrun and accelerate. Rank 1 prints the wall-clock time at which it raises, so the test can
measure how long the job took to end after the failure. The product code has no hook for this: we wrap ``EpochLoop._train_step``.

    torchrun --standalone --nproc_per_node=2 tests/faulty_worker.py key=value ...
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from trainer.__main__ import main  # noqa: E402
from trainer.train import epoch  # noqa: E402

MESSAGE = "injected failure on rank 1"
FAIL_AFTER = int(os.environ.get("FAIL_AFTER_STEPS", "2"))
original_step = epoch.EpochLoop._train_step
calls = 0


def failing_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
    global calls
    result = original_step(self, *args, **kwargs)
    calls += 1
    if os.environ.get("RANK") == "1" and calls >= FAIL_AFTER:
        print(f"faulty_worker: rank 1 raises at {time.time():.3f}", file=sys.stderr, flush=True)
        raise RuntimeError(MESSAGE)
    return result


epoch.EpochLoop._train_step = failing_step  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
