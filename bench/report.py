"""The results table (Markdown, so it can be pasted into docs/benchmarks.md), details and JSON."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from bench.common import Row, median
from bench.overhead import Overhead
from bench.startup import PHASES, Startup
from bench.throughput import Throughput

REPO = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    """What the numbers were measured on, and how busy the machine was when the run started."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": datetime.date.today().isoformat(), "cpu": cpu, "cores": len(os.sched_getaffinity(0)),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__, "python": platform.python_version(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_average_start": os.getloadavg(),
        "git": _git("rev-parse", "--short", "HEAD"), "trainer_changes": _git("status", "--porcelain", "trainer"),
    }


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def table(rows: list[Row]) -> str:
    """One Markdown row per comparison: medians, their ratio, the spread of per-round ratios, the goal."""
    lines = ["| case | metric | Worker | baseline | ratio | per-round ratios | goal | |",
             "|---|---|---:|---:|---:|---|---|---|"]
    for row in rows:
        spread = f"{min(row.pair_ratios):.3f} .. {max(row.pair_ratios):.3f}" if row.pair_ratios else ""
        lines.append(f"| {row.case} | {row.metric} | {_num(row.worker)} | {_num(row.baseline)} ({row.baseline_name}) "
                     f"| **{row.ratio:.3f}** | {spread} | {row.goal_text} | {'ok' if row.ok else 'MISSED'} |")
    return "\n".join(lines)


def _num(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def throughput_details(result: Throughput) -> list[str]:
    lines = [_same_work(result.param_max_abs_diff, result.param_max_abs_moved),
             f"- {result.gflop_per_image:.3f} GFLOP per image (forward + backward, FlopCounterMode); achieved "
             + ", ".join(f"{side} {median(r) * result.gflop_per_image / 1e3:.3f} TFLOP/s"
                         for side, r in result.images_per_s.items())]
    if result.peak_tflops:
        lines.append(f"- MFU vs {result.peak_tflops:g} TFLOP/s bf16 dense peak: worker {result.mfu('worker'):.1%}, "
                     f"hand-written {result.mfu('plain'):.1%}")
    if result.syncs_per_epoch:
        lines.append(f"- synchronizing CUDA calls per {result.steps}-step epoch (incl. the timing's own): "
                     + ", ".join(f"{k} {v}" for k, v in result.syncs_per_epoch.items()))
    return lines


def _same_work(diff: float, moved: float) -> str:
    return (f"- same work: after all rounds the two models differ by at most {diff:.1e} per parameter/buffer "
            f"(they moved up to {moved:.1e} from the shared start weights, on the same batches)")


def overhead_details(result: Overhead) -> list[str]:
    base = median(result.us_per_step["worker"])
    plain = median(result.us_per_step["hand-written"])
    lines = [_same_work(result.param_max_abs_diff, result.param_max_abs_moved),
             f"- Worker overhead: {base - plain:+.1f} us/step over the hand-written loop's {plain:.1f} us/step"]
    if len(result.us_per_step) > 2:
        lines += ["", "| variant | us/step (median) | vs Worker | vs hand-written |", "|---|---:|---:|---:|"]
        for name, values in result.us_per_step.items():
            m = median(values)
            lines.append(f"| {name} | {m:.1f} | {m - base:+.1f} | {m - plain:+.1f} |")
    if result.extra_ops_per_step:
        lines += ["", "- ATen ops per step in the Worker beyond the hand-written loop's: "
                  + ", ".join(f"{name} x{n:.2g}" for name, n in result.extra_ops_per_step.items())]
    return lines


def startup_details(result: Startup) -> list[str]:
    lines = ["| side | " + " | ".join(PHASES) + " |", "|---|" + "---:|" * len(PHASES)]
    for side, marks in result.marks.items():
        lines.append(f"| {side} | " + " | ".join(f"{median(marks[p]):.2f}" if p in marks else "" for p in PHASES) + " |")
    return ["- seconds after spawn (medians) at which each child reached each phase:", "", *lines]


def to_json(path: Path, meta: dict[str, Any], rows: list[Row], details: dict[str, Any]) -> None:
    """Everything, raw samples included, as one JSON document."""
    out = {"meta": meta, "rows": [{**dataclasses.asdict(r), "ratio": r.ratio, "ok": r.ok} for r in rows],
           "details": {k: dataclasses.asdict(v) for k, v in details.items()}}
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")
