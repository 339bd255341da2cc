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

from bench.common import Row, median, percentile
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
    lines = ["| case | metric | Worker | baseline | ratio | [min, max] | ratio of medians | CPU-time ratio | goal | |",
             "|---|---|---:|---:|---:|---|---:|---:|---|---|"]
    for row in rows:
        pairs = row.pair_ratios
        spread = f"[{min(pairs):.2f}, {max(pairs):.2f}]" if pairs else ""
        cpu = f"{row.cpu_ratio:.3f}" if row.cpu_ratio else "-"
        lines.append(f"| {row.case} | {row.metric} | {_num(row.worker)} | {_num(row.baseline)} ({row.baseline_name}) "
                     f"| **{row.ratio:.3f}** | {spread} | {row.ratio_of_medians:.3f} | {cpu} | {row.goal_text} "
                     f"| {row.verdict} |")
    notes = [f"- {row.case.split(':')[0]}: {row.note}" for row in rows if row.note]
    return "\n".join(lines + ([""] + notes if notes else []))


def _num(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def throughput_details(result: Throughput) -> list[str]:
    lines = [_same_work(result.param_max_abs_diff, result.param_max_abs_moved),
             f"- {result.gflop_per_image:.3f} GFLOP per image (forward + backward, FlopCounterMode); achieved "
             + ", ".join(f"{side} {median(r) * result.gflop_per_image / 1e3:.3f} TFLOP/s"
                         for side, r in result.images_per_s.items())]
    steps = result.step_us
    if all(steps.values()):
        lines.append("- per-step wall time, all rounds pooled: " + ", ".join(
            f"{side} median {median(v) / 1e3:.0f} ms, p10 {percentile(v, 0.1) / 1e3:.0f} ms" for side, v in steps.items())
            + f" (Worker / hand-written: median {median(steps['worker']) / median(steps['plain']):.3f}, "
              f"p10 {percentile(steps['worker'], 0.1) / percentile(steps['plain'], 0.1):.3f})")
    if result.peak_tflops:
        lines.append(f"- MFU vs {result.peak_tflops:g} TFLOP/s bf16 dense peak: worker {result.mfu('worker'):.1%}, "
                     f"hand-written {result.mfu('plain'):.1%}")
    if result.syncs_per_epoch:
        lines.append(f"- synchronizing CUDA calls per {result.steps}-step epoch (incl. the timing's own): "
                     + ", ".join(f"{k} {v}" for k, v in result.syncs_per_epoch.items()))
    return lines


def _same_work(diff: float, moved: float) -> str:
    return (f"- same work: after all rounds the two models differ by at most {diff:.1e} per parameter/buffer "
            f"(they moved up to {moved:.1e} from the shared start weights, on the same batches; the Worker's "
            f"fused SGD rounds differently from PyTorch's default in the last bit, and many steps of "
            f"training amplify that)")


def overhead_details(result: Overhead) -> list[str]:
    plain, cpu_plain = median(result.us_per_step["hand-written"]), median(result.cpu_us_per_step["hand-written"])
    return [_same_work(result.param_max_abs_diff, result.param_max_abs_moved),
            f"- Worker overhead per tiny step: {median(result.us_per_step['worker']) - plain:+.1f} us wall "
            f"(hand-written: {plain:.1f}), {median(result.cpu_us_per_step['worker']) - cpu_plain:+.1f} us CPU "
            f"(hand-written: {cpu_plain:.1f})",
            "- per-step wall time, median of every single step (hardly affected by preemption, but blind to "
            "the logging every 50 steps): " + ", ".join(f"{side} {median(v):.1f} us"
                                                         for side, v in result.step_us.items())
            + f" (ratio {median(result.step_us['worker']) / median(result.step_us['hand-written']):.3f})"]


def startup_details(result: Startup) -> list[str]:
    lines = ["| side | " + " | ".join(PHASES) + " |", "|---|" + "---:|" * len(PHASES)]
    for side, marks in result.marks.items():
        lines.append(f"| {side} | " + " | ".join(f"{median(marks[p]):.2f}" if p in marks else "" for p in PHASES) + " |")
    return ["- seconds after spawn (medians) at which each child reached each phase, and its own CPU seconds "
            "(main process) at the first step:", "", *lines]


def to_json(path: Path, meta: dict[str, Any], rows: list[Row], details: dict[str, Any]) -> None:
    """Everything, raw samples included, as one JSON document."""
    out = {"meta": meta, "rows": [{**dataclasses.asdict(r), "ratio": r.ratio, "ratio_of_medians": r.ratio_of_medians,
                                   "ok": r.ok} for r in rows],
           "details": {k: dataclasses.asdict(v) for k, v in details.items()}}
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")
