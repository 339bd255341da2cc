"""The real trainer, except that rank 1 of the first torchrun attempt dies after optimizer step CRASH_AT.

Used to test ``torchrun --max-restarts``: the restarted workers must resume from the latest
checkpoint and finish the run.
"""

import os
import sys

from trainer.__main__ import main
from trainer.train import epoch

CRASH_AT = int(os.environ.get("CRASH_AT_STEP", "6"))
original_step = epoch.EpochLoop._train_step


def crashing_step(self, *args):  # type: ignore[no-untyped-def]
    result = original_step(self, *args)
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first_attempt and os.environ.get("RANK") == "1" and self.record.global_step >= CRASH_AT:
        print(f"crash_once_worker: rank 1 dies at step {self.record.global_step}", file=sys.stderr, flush=True)
        os._exit(17)
    return result


epoch.EpochLoop._train_step = crashing_step  # type: ignore[method-assign]
main()
