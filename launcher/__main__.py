"""``python -m launcher [options] [-- trainer overrides]``: start the Worker the right way for this machine."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from launcher import nodes
from launcher.plan import SHUTDOWN_TIMEOUT_S, STOP_SIGNALS, Machine, Plan, Request, make_plan
from launcher.reaper import HangReaper
from launcher.relay import StopRelay
from trainer.errors import EXIT_FAILURE, EXIT_HANG, EXIT_USER_ERROR, UserError
from trainer.parallel import openmp, slurm

RELAYED_SIGNALS = ["SIGTERM", "SIGINT", "SIGUSR1"]
"""The trainer's stop signals (ckpt.warning_signal's default included): the launcher relays them
itself to keep the workers' exit codes (see launcher/relay.py); torchrun handles the others."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    ours, trainer_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        prog="python -m launcher", description="Start the trainer on this machine: one process, torchrun "
        "(one process per GPU, or --nproc CPU processes), accelerate, or one torchrun per node (SLURM, "
        "--nnodes, or a Kubernetes PyTorchJob).",
        epilog="Example: python -m launcher --nproc 2 -- train.epochs=3 optim.lr=0.1")
    parser.add_argument("--nproc", type=int, help="processes per node (default: one per GPU, else 1)")
    parser.add_argument("--via", choices=("auto", "python", "torchrun", "accelerate"), default="auto",
                        help="which launcher starts the workers (default: auto)")
    parser.add_argument("--max-restarts", type=int, default=0, help="torchrun: restart failed workers N times")
    parser.add_argument("--shutdown-timeout", type=int, default=SHUTDOWN_TIMEOUT_S, metavar="SECONDS",
                        help="after a stop signal, seconds the workers get to save a checkpoint before they "
                        f"are killed (default: {SHUTDOWN_TIMEOUT_S})")
    several = parser.add_argument_group("several nodes without a scheduler (one launcher per node)")
    several.add_argument("--nnodes", metavar="N|MIN:MAX", help="number of nodes, or an elastic range")
    several.add_argument("--node-rank", type=int, help="this node's rank; node 0 hosts the rendezvous")
    several.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="node 0's address and a free port, "
                         "the same on every node")
    several.add_argument("--rdzv-id", help=f"a job id, the same on every node (default: {nodes.DEFAULT_RDZV_ID})")
    several.add_argument("--local-addr", metavar="HOST", help="the address the other nodes reach this one at "
                         "(default: its host name, which must resolve to such an address)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the equivalent command, then exit")
    args = parser.parse_args(ours)
    if args.nproc is not None and args.nproc < 1:
        parser.error("--nproc must be at least 1")
    if args.shutdown_timeout < 0:
        parser.error("--shutdown-timeout must be 0 or more seconds")
    args.trainer_args = trainer_args
    return args


def inspect_machine() -> Machine:
    """Count GPUs and cores, check MPS, read the SLURM or PyTorchJob variables, feature-test torchrun."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return Machine(gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0,
                   mps=bool(mps and mps.is_available()), slurm=slurm.allocation(), cores=cores,
                   torchrun_options=torchrun_options(), omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                   pytorchjob=nodes.pytorchjob())


def torchrun_options() -> frozenset[str]:
    """Which of the options the launcher may pass this torch's torchrun accepts (older ones lack some)."""
    from torch.distributed.run import get_args_parser

    usage = get_args_parser().format_usage()
    return frozenset(option for option in ("--signals-to-handle", "--shutdown-timeout") if option in usage)


def execute(plan: Plan, shutdown_timeout: int) -> int:
    """Run the plan: exec the single process or accelerate, or run torchrun's machinery in-process."""
    sys.stdout.flush()
    openmp.restore_user_wait_policy()  # each Worker chooses its own, from the plan's env
    os.environ.update(plan.env)
    if plan.launcher == "python":
        os.execv(sys.executable, plan.argv)
    if plan.launcher == "accelerate":
        os.execv(sys.executable, [sys.executable, "-m", "accelerate.commands.launch", *plan.argv[2:]])
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    argv = plan.argv[1:]
    relay = StopRelay(RELAYED_SIGNALS, shutdown_timeout)
    if relay.supported():
        relay.install()
        others = ",".join(name for name in STOP_SIGNALS.split(",") if name not in RELAYED_SIGNALS)
        argv = [f"--signals-to-handle={others}" if arg.startswith("--signals-to-handle=") else arg for arg in argv]
    reaper = HangReaper()  # ends a rank the workers' hang verdict names as not answering
    reaper.start()
    try:
        torchrun(argv)
    except ChildFailedError as exc:
        codes = [failure.exitcode for failure in exc.failures.values()]
        code = next((code for code in codes if code > 0), EXIT_FAILURE)
        ended = ", ".join(f"rank {rank} " + (f"exit {f.exitcode}" if f.exitcode >= 0 else
                                              f"killed by {signal.Signals(-f.exitcode).name}")
                          for rank, f in sorted(exc.failures.items()))
        print(f"launcher: workers that failed: {ended}", file=sys.stderr)
        if code == EXIT_HANG:  # the workers' verdict, last, after torchrun's own lines
            messages = [f.message.get("message") if isinstance(f.message, dict) else f.message
                        for f in exc.failures.values()]  # what a worker wrote to its error file
            verdicts = [m for m in messages if isinstance(m, str) and m.startswith("hang: ")]
            if verdicts:
                print(f"launcher: {verdicts[0]}", file=sys.stderr)
        return code
    except SignalException as exc:
        code = relay.exit_code(int(exc.sigval))
        outcome = {0: "the workers had finished", 3: "the workers saved a checkpoint and stopped"}.get(
            code, f"the workers did not all stop cleanly (exit {code})")
        if relay.killed:
            outcome += f"; {len(relay.killed)} killed after --shutdown-timeout {shutdown_timeout} s"
        print(f"launcher: got {exc.sigval.name}: {outcome}", file=sys.stderr)
        return code
    finally:
        reaper.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    request = Request(nproc=args.nproc, via=args.via, max_restarts=args.max_restarts,
                      shutdown_timeout=args.shutdown_timeout, nnodes=args.nnodes, node_rank=args.node_rank,
                      rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id,
                      local_addr=args.local_addr, trainer_args=args.trainer_args)
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
    return execute(plan, args.shutdown_timeout)


if __name__ == "__main__":
    sys.exit(main())
