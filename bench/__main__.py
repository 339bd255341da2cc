"""``python -m bench``: is the Worker's training step as fast as the plainest hand-written loop?

Cases (each compares medians of interleaved rounds, see docs/benchmarks.md):

* throughput: steady-state images/s, Worker vs hand-written, one process (+ MFU on CUDA);
* scaling: the Worker in 2 processes (torchrun, gloo) vs 1 process on the same total work;
* overhead: us/step on tiny steps (one Linear layer), logging and progress bar on;
* startup: seconds from process start to the first finished step, ``python -m trainer`` vs a script.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bench import overhead, report, scaling, startup, throughput
from bench.common import Row, Spec

CASES = ("throughput", "scaling", "overhead", "startup")
STARTED = time.monotonic()


@dataclass(frozen=True)
class Plan:
    """How much work each case does; :func:`plan` picks one per device and ``--quick``."""

    spec: Spec  # throughput (and, per process, scaling)
    steps: int = 2  # timed steps per side per round: short rounds pair up well on a busy machine
    warmup: int = 2
    repeats: int = 20  # interleaved rounds of the throughput case
    scaling_steps: int = 3
    scaling_epochs: int = 2  # timed epochs per child job
    scaling_repeats: int = 2
    tiny: Spec = Spec("linear", 16, 16, 10)
    tiny_steps: int = 2000
    tiny_repeats: int = 7
    startup_repeats: int = 5
    cases: tuple[str, ...] = CASES


def plan(device: str, quick: bool) -> Plan:
    tiny = Spec("linear", 16, 16, 10, device=device)
    if device == "cuda":
        cases = ("throughput", "overhead") + (("scaling",) if torch.cuda.device_count() >= 2 else ())
        full = Plan(Spec("resnet50", 224, 256, 10, "bf16", True, "cuda"), steps=10, warmup=10, repeats=10,
                    scaling_steps=10, tiny=tiny, cases=cases)
        return replace(full, spec=replace(full.spec, batch=64), warmup=3, repeats=3) if quick else full
    if quick:
        return Plan(Spec("resnet18", 32, 16), warmup=1, repeats=3, scaling_steps=2, scaling_epochs=1,
                    scaling_repeats=1, tiny_steps=300, tiny_repeats=3, startup_repeats=2)
    return Plan(Spec("resnet18", 64, 64))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="much shorter run, to check that everything works")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: resnet18 64px fp32; cuda: resnet50 224px bf16 channels_last + MFU")
    parser.add_argument("--repeats", type=int,
                        help="interleaved rounds of every comparison (default: throughput 20, tiny steps 7, start-up 5)")
    parser.add_argument("--steps", type=int, help="timed steps per side per round in the throughput case (default 2)")
    parser.add_argument("--cases", help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--peak-tflops", type=float, help="peak FLOP/s for MFU if the GPU is not in the table")
    parser.add_argument("--check", action="store_true", help="exit with status 1 if any goal is missed")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every sample as JSON")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one, removed after)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"bench: --device cuda needs a visible CUDA GPU, but torch.cuda.is_available() is False "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run it on a GPU machine "
              "or use --device cpu", file=sys.stderr)
        return 2
    p = plan(args.device, args.quick)
    p = replace(p, repeats=args.repeats or p.repeats, steps=args.steps or p.steps,
                tiny_repeats=args.repeats or p.tiny_repeats, startup_repeats=args.repeats or p.startup_repeats,
                cases=tuple(args.cases.split(",")) if args.cases else p.cases)
    unknown = set(p.cases) - set(CASES)
    if unknown:
        print(f"bench: unknown case(s) {', '.join(sorted(unknown))}; choose from {', '.join(CASES)}", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        return run(p, args, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def run(p: Plan, args: argparse.Namespace, workdir: Path) -> int:
    meta = report.machine()
    print(f"bench {meta['date']}: {meta['cpu']} ({meta['cores']} cores){', ' + meta['gpu'] if meta['gpu'] else ''}, "
          f"torch {meta['torch']}, OMP_WAIT_POLICY={meta['omp_wait_policy']}, "
          f"load average {meta['load_average_start'][0]:.1f}, git {meta['git']}"
          f"{' + uncommitted trainer/ changes' if meta['trainer_changes'] else ''}", flush=True)
    rows: list[Row] = []
    details: dict[str, Any] = {}
    notes: list[str] = []
    if "throughput" in p.cases:
        _say(f"throughput: {p.spec.describe()}, {p.repeats} rounds x {p.steps} steps per side")
        details["throughput"] = result = throughput.measure(p.spec, workdir, p.steps, p.warmup, p.repeats,
                                                           args.peak_tflops)
        rows.append(result.row)
        notes += report.throughput_details(result)
    if "scaling" in p.cases:
        _say(f"scaling: {p.scaling_repeats} rounds of fresh 1- and 2-process jobs")
        rows.append(scaling.measure(p.spec, workdir, p.scaling_steps, 1, p.scaling_epochs, p.scaling_repeats))
    if "overhead" in p.cases:
        _say(f"overhead: {p.tiny.describe()}, {p.tiny_repeats} rounds x {p.tiny_steps} steps")
        details["overhead"] = tiny = overhead.measure(p.tiny, workdir, p.tiny_steps, 50, p.tiny_repeats)
        rows.append(tiny.row)
        notes += report.overhead_details(tiny)
    if "startup" in p.cases:
        _say(f"startup: {p.startup_repeats} fresh processes per side")
        details["startup"] = boot = startup.measure(replace(p.tiny, device="cpu"), workdir, p.startup_repeats)
        rows.append(boot.row)
        notes += report.startup_details(boot)
    _say("done")
    meta["torch_threads"] = torch.get_num_threads()
    meta["load_average_end"] = os.getloadavg()
    print(f"\nResults: Worker and baseline are medians; ratio = median over rounds of Worker / baseline "
          f"(each round times both back to back), [min, max] over rounds; torch threads {meta['torch_threads']}; "
          f"load average {meta['load_average_start'][0]:.1f} at start, {meta['load_average_end'][0]:.1f} at end\n")
    print(report.table(rows))
    print("\n" + "\n".join(notes))
    if args.json:
        report.to_json(args.json, meta, rows, details)
        print(f"\nJSON: {args.json}")
    return 1 if args.check and not all(row.ok for row in rows) else 0


def _say(message: str) -> None:
    """Progress on stderr, with the seconds since the run started."""
    print(f"... [{time.monotonic() - STARTED:5.0f} s] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
