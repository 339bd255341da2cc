"""Start-up child, Worker side: ``python -m trainer ARGS`` that leaves right after its first training step.

It runs ``trainer.__main__.run`` (what ``python -m trainer`` runs) with one probe: the Worker's
``_train_step`` prints ``MARK first_step <time.time()>`` once it returns, then stops the run.
Further ``MARK`` lines time the phases before it.
"""

import sys
import time

print(f"MARK python_up {time.time():.6f} {time.process_time():.6f}", flush=True)

from trainer import __main__ as cli  # noqa: E402  (the marks above and below time these imports)
from trainer.worker import Worker  # noqa: E402

print(f"MARK imports {time.time():.6f} {time.process_time():.6f}", flush=True)


class FirstStepDone(Exception):
    """Raised after the first step to unwind ``run`` (DataLoader workers shut down on the way)."""


def main() -> int:
    build, step = Worker.__init__, Worker._train_step

    def timed_build(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        build(self, *args, **kwargs)
        print(f"MARK built {time.time():.6f} {time.process_time():.6f}", flush=True)

    def first_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        step(self, *args, **kwargs)
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        print(f"MARK first_step {time.time():.6f} {time.process_time():.6f}", flush=True)
        raise FirstStepDone

    Worker.__init__, Worker._train_step = timed_build, first_step  # type: ignore[method-assign]
    try:
        cli.run(sys.argv[1:])
    except FirstStepDone:
        return 0
    return 1  # the run ended without a training step


if __name__ == "__main__":
    sys.exit(main())
