"""``python -m launcher [options] [-- trainer overrides]``: start the Worker the right way for this machine."""

from __future__ import annotations

import argparse
import os
import sys

from launcher.plan import Machine, Plan, Request, make_plan
from trainer import slurm
from trainer.errors import EXIT_FAILURE, EXIT_USER_ERROR, UserError


def parse_args(argv: list[str]) -> Request:
    ours, trainer_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        prog="python -m launcher", description="Start the trainer on this machine: one process, torchrun "
        "(one process per GPU, or --nproc CPU processes), accelerate, or one torchrun per SLURM node.",
        epilog="Example: python -m launcher --nproc 2 -- train.epochs=3 optim.lr=0.1")
    parser.add_argument("--nproc", type=int, help="processes per node (default: one per GPU, else 1)")
    parser.add_argument("--via", choices=("auto", "python", "torchrun", "accelerate"), default="auto",
                        help="which launcher starts the workers (default: auto)")
    parser.add_argument("--max-restarts", type=int, default=0, help="torchrun: restart failed workers N times")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the equivalent command, then exit")
    args = parser.parse_args(ours)
    if args.nproc is not None and args.nproc < 1:
        parser.error("--nproc must be at least 1")
    args.trainer_args = trainer_args
    return args


def inspect_machine() -> Machine:
    """Count GPUs, check MPS and read the SLURM allocation."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    return Machine(gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0,
                   mps=bool(mps and mps.is_available()), slurm=slurm.allocation())


def execute(plan: Plan) -> int:
    """Run the plan: exec the single process or accelerate, or run torchrun's machinery in-process."""
    sys.stdout.flush()
    if plan.launcher == "python":
        os.execv(sys.executable, plan.argv)
    if plan.launcher == "accelerate":
        os.execv(sys.executable, [sys.executable, "-m", "accelerate.commands.launch", *plan.argv[2:]])
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(plan.argv[1:])
    except ChildFailedError as exc:
        codes = [failure.exitcode for failure in exc.failures.values()]
        return next((code for code in codes if code > 0), EXIT_FAILURE)
    except SignalException as exc:
        print(f"launcher: got {exc.sigval.name}; the workers were asked to save a checkpoint and stop",
              file=sys.stderr)
        return 128 + int(exc.sigval)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    request = Request(nproc=args.nproc, via=args.via, max_restarts=args.max_restarts,
                      trainer_args=args.trainer_args)
    try:
        plan = make_plan(inspect_machine(), request)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    for line in plan.lines():
        print(f"launcher: {line}")
    print(f"launcher: command            {plan.command()}")
    if args.dry_run:
        return 0
    return execute(plan)


if __name__ == "__main__":
    sys.exit(main())
