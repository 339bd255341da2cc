"""``python -m bench``: is ``python -m trainer`` as fast as the plainest hand-written loop?

Cases (each compares medians of interleaved rounds of fresh processes, see docs/benchmarks.md):

* files: image files end to end (224 px JPEG and 64 px PNG), Worker vs the tutorial loop, on 1
  process and on 2 gloo processes (torchrun on both sides);
* throughput: steady-state images/s on tensors in memory, Worker vs hand-written, one process;
* scaling: the Worker in 2 processes (torchrun, gloo) vs 1 process on the same total work;
* overhead: us/step on tiny steps (one Linear layer), logging and progress bar on;
* startup: seconds from process start to the first finished step, ``python -m trainer`` vs a script;
* decode: images/s per core (one loader worker, one thread) of each JPEG decode path and of prepared
  shards, the tutorial pipeline on the original photos as baseline;
* scale: a 200,000-image folder: first and cached scan, a cached 4-process start, loader worker memory;
* loader_workers: JPEG batches/s a main process with a fixed step receives, by loader worker count,
  the trainer's loader (its worker policies, ``data.num_workers=auto``) vs a plain DataLoader.

The hand-written side is always ``bench/plain_loop.py`` run by path, as a user's script: it imports
neither ``trainer`` nor ``bench``, and every child starts from the user's environment.
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

from bench import decode, files, loader_workers, overhead, report, scale, scaling, startup, throughput
from bench.common import Row

CASES = ("files", "throughput", "scaling", "overhead", "startup", "decode", "scale", "loader_workers")
DEFAULT_CACHE = Path("~/.cache/launchpad").expanduser()  # data.cache_dir's default: the sets are reused
STARTED = time.monotonic()


@dataclass(frozen=True)
class Plan:
    """How many interleaved rounds each case runs; :func:`plan` picks one per device and ``--quick``."""

    files_rounds: int = 3
    throughput_rounds: int = 5
    scaling_rounds: int = 3
    overhead_rounds: int = 5
    startup_repeats: int = 5
    cases: tuple[str, ...] = CASES


def plan(device: str, quick: bool) -> Plan:
    if device == "cuda":
        return Plan(throughput_rounds=2 if quick else 3, overhead_rounds=2 if quick else 3,
                    cases=("throughput", "overhead"))
    if quick:
        return Plan(1, 1, 1, 1, 1)
    return Plan()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: checks that everything works")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: resnet18 64px fp32; cuda: resnet50 224px bf16 channels_last + MFU")
    parser.add_argument("--repeats", type=int, help="interleaved rounds of every comparison")
    parser.add_argument("--cases", help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--nproc", default="1,2", help="process counts of the files case (default 1,2)")
    parser.add_argument("--check", action="store_true", help="exit with status 1 if any goal is missed")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every sample as JSON")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one, removed after)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help=f"where the generated image sets are kept and reused (default {DEFAULT_CACHE})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"bench: --device cuda needs a visible CUDA GPU, but torch.cuda.is_available() is False "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run it on a GPU machine "
              "or use --device cpu", file=sys.stderr)
        return 2
    p = plan(args.device, args.quick)
    if args.repeats:
        p = replace(p, files_rounds=args.repeats, throughput_rounds=args.repeats, scaling_rounds=args.repeats,
                    overhead_rounds=args.repeats, startup_repeats=args.repeats)
    if args.cases:
        p = replace(p, cases=tuple(args.cases.split(",")))
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
          f"torch {meta['torch']}, OMP_WAIT_POLICY={meta['omp_wait_policy'] or 'unset'} (as the children get it), "
          f"load average {meta['load_average_start'][0]:.1f}, git {meta['git']}"
          f"{' + uncommitted trainer/ changes' if meta['trainer_changes'] else ''}", flush=True)
    rows: list[Row] = []
    details: dict[str, Any] = {}
    notes: list[str] = []

    def record(name: str, result: Any) -> None:
        details[name] = result
        rows.append(result.row)
        notes.extend(report.comparison_details(name, result))

    if "files" in p.cases:
        for nproc in (int(n) for n in args.nproc.split(",")):
            for work in files.workloads(args.cache_dir, args.quick):
                _say(f"files: {work.describe()}, {nproc} process(es), {p.files_rounds} rounds")
                record(f"files {work.label.split()[0]} {nproc}p", files.measure(work, nproc, p.files_rounds, workdir))
    if "throughput" in p.cases:
        work = throughput.workload(args.device, args.quick)
        _say(f"throughput: {work.describe()}, {p.throughput_rounds} rounds")
        record("throughput", throughput.measure(work, p.throughput_rounds, workdir))
    if "scaling" in p.cases and args.device == "cpu":
        work = throughput.workload("cpu", args.quick)
        _say(f"scaling: {p.scaling_rounds} rounds of 1- and 2-process jobs")
        record("scaling", scaling.measure(work, p.scaling_rounds, workdir))
    if "overhead" in p.cases:
        work = replace(overhead.workload(args.quick), device=args.device)
        _say(f"overhead: {work.describe()}, {p.overhead_rounds} rounds")
        record("overhead", overhead.measure(work, p.overhead_rounds, workdir))
    if "startup" in p.cases:
        _say(f"startup: {p.startup_repeats} fresh processes per side")
        details["startup"] = boot = startup.measure(workdir, p.startup_repeats)
        rows.append(boot.row)
        notes += report.startup_details(boot)
    if "decode" in p.cases and args.device == "cpu":
        _say("decode: images/s per core (one loader worker, one thread), JPEG 224 px")
        decode_plan = decode.Plan(images=8, repeats=2) if args.quick else decode.Plan()
        details["decode"] = decoded = decode.measure(workdir, decode_plan)
        rows += decoded.rows
    if "scale" in p.cases and args.device == "cpu":
        tree = scale.QUICK if args.quick else scale.FULL
        _say(f"scale: {tree.classes * tree.per_class} images")
        rows += scale.measure(args.cache_dir, tree, 2 if args.quick else 4)
    if "loader_workers" in p.cases and args.device == "cpu":
        work = loader_workers.QUICK if args.quick else loader_workers.Plan()
        work = replace(work, rounds=args.repeats) if args.repeats else work
        _say(f"loader_workers: {work.rounds} rounds per worker count {', '.join(work.workers)}")
        rows += loader_workers.measure(work, args.cache_dir).rows
    _say("done")
    meta["load_average_end"] = os.getloadavg()
    print(f"\nResults: Worker and baseline are medians; ratio = median over rounds of Worker / baseline "
          f"(each round runs both back to back), [min, max] over rounds; load average "
          f"{meta['load_average_start'][0]:.1f} at start, {meta['load_average_end'][0]:.1f} at end\n")
    print(report.table(rows))
    print("\n" + "\n".join(notes))
    if args.json:
        report.to_json(args.json, meta, rows, details)
        print(f"\nJSON: {args.json}")
    return 1 if args.check and not all(row.ok for row in rows) else 0


def _say(message: str) -> None:
    """Progress on stderr, with the seconds since the run started and the load average."""
    print(f"... [{time.monotonic() - STARTED:5.0f} s, load {os.getloadavg()[0]:.1f}] {message}", file=sys.stderr,
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
