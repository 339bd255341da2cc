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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bench import overhead, report, scaling, startup, throughput
from bench.common import Row, Spec

CASES = ("throughput", "scaling", "overhead", "startup")


@dataclass(frozen=True)
class Plan:
    """How much work each case does; :func:`plan` picks one per device and ``--quick``."""

    spec: Spec
    steps: int
    warmup: int
    repeats: int
    scaling_steps: int
    scaling_epochs: int
    scaling_repeats: int
    tiny: Spec
    tiny_steps: int
    startup_repeats: int
    cases: tuple[str, ...]


def plan(device: str, quick: bool) -> Plan:
    tiny = Spec("linear", 16, 16, 10, device=device)
    if device == "cuda":
        spec = Spec("resnet50", 224, 64 if quick else 128, 10, "bf16", True, "cuda")
        cases = ("throughput", "overhead") + (("scaling",) if torch.cuda.device_count() >= 2 else ())
        return Plan(spec, 10 if quick else 30, 3 if quick else 10, 2 if quick else 5, 5, 2, 1 if quick else 2,
                    tiny, 300 if quick else 2000, 2 if quick else 5, cases)
    if quick:
        return Plan(Spec("resnet18", 32, 16), 3, 1, 2, 2, 1, 1, tiny, 300, 2, CASES)
    return Plan(Spec("resnet18", 64, 64), 8, 2, 5, 3, 2, 2, tiny, 2000, 5, CASES)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="much shorter run, to check that everything works")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: resnet18 64px fp32; cuda: resnet50 224px bf16 channels_last + MFU")
    parser.add_argument("--repeats", type=int, help="interleaved rounds per comparison (default 5, --quick 2)")
    parser.add_argument("--steps", type=int, help="timed steps per round in the throughput case")
    parser.add_argument("--cases", help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--ablation", action="store_true",
                        help="also attribute the tiny-step overhead to Worker features (about 1-2 min more)")
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
                startup_repeats=args.repeats or p.startup_repeats,
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
        _say(f"overhead: {p.tiny.describe()}, {p.repeats} rounds x {p.tiny_steps} steps"
             f"{' with ablation' if args.ablation else ''}")
        details["overhead"] = tiny = overhead.measure(p.tiny, workdir, p.tiny_steps, 50, p.repeats, args.ablation)
        rows.append(tiny.row)
        notes += report.overhead_details(tiny)
    if "startup" in p.cases:
        _say(f"startup: {p.startup_repeats} fresh processes per side")
        details["startup"] = boot = startup.measure(replace(p.tiny, device="cpu"), workdir, p.startup_repeats)
        rows.append(boot.row)
        notes += report.startup_details(boot)
    meta["torch_threads"] = torch.get_num_threads()
    meta["load_average_end"] = os.getloadavg()
    print(f"\nResults: medians; ratio = Worker / baseline; torch threads {meta['torch_threads']}; "
          f"load average {meta['load_average_start'][0]:.1f} at start, {meta['load_average_end'][0]:.1f} at end\n")
    print(report.table(rows))
    print("\n" + "\n".join(notes))
    if args.json:
        report.to_json(args.json, meta, rows, details)
        print(f"\nJSON: {args.json}")
    return 1 if args.check and not all(row.ok for row in rows) else 0


def _say(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
