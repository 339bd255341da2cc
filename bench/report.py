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
from bench.startup import PHASES, Startup
from bench.versus import Comparison
from trainer.parallel import openmp

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
        "omp_wait_policy": openmp.USER_WAIT_POLICY, "load_average_start": os.getloadavg(),
        "git": _git("rev-parse", "--short", "HEAD"), "trainer_changes": _git("status", "--porcelain", "trainer"),
    }


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def table(rows: list[Row]) -> str:
    """One Markdown row per comparison: medians, their ratio, the spread of per-round ratios, the goal."""
    lines = ["| case | metric | Worker | baseline | ratio | [min, max] | ratio of medians | goal | |",
             "|---|---|---:|---:|---:|---|---:|---|---|"]
    for row in rows:
        pairs = row.pair_ratios
        spread = f"[{min(pairs):.2f}, {max(pairs):.2f}]" if pairs else ""
        lines.append(f"| {row.case} | {row.metric} | {_num(row.worker)} | {_num(row.baseline)} ({row.baseline_name}) "
                     f"| **{row.ratio:.3f}** | {spread} | {row.ratio_of_medians:.3f} | {row.goal_text} "
                     f"| {row.verdict} |")
    notes = [f"- {row.case.split(':')[0]}: {row.note}" for row in rows if row.note]
    return "\n".join(lines + ([""] + notes if notes else []))


def _num(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def comparison_details(name: str, result: Comparison) -> list[str]:
    """Same work (model, parameters, samples per epoch on each side) and the Worker's data wait."""
    same = result.same_work
    agreed = len({tuple(v) for v in same.values()}) == 1 and all(len(v) == 1 for v in same.values())
    described = "; ".join(f"{side}: " + ", ".join(f"{m} ({p:,} parameters, {n} samples/epoch)" for m, p, n in v)
                          for side, v in same.items())
    lines = [f"- {name}: same work {'yes' if agreed else 'NO'} ({described})"]
    waits = [w for run in result.runs.get("worker", []) for w in run.extra.get("data_wait", [])[1:] if w is not None]
    if waits:
        lines[-1] += f"; Worker's data wait {100 * median(waits):.0f}% of the timed epochs (median)"
    return lines


def startup_details(result: Startup) -> list[str]:
    lines = ["| side | " + " | ".join(PHASES) + " |", "|---|" + "---:|" * len(PHASES)]
    for side, marks in result.marks.items():
        cells = [f"{median(marks[p]):.2f}" if p in marks else "" for p in PHASES]
        lines.append(f"| {side} | " + " | ".join(cells) + " |")
    return ["- seconds after spawn (medians) at which each child's line for each phase reached the parent:",
            "", *lines]


def to_json(path: Path, meta: dict[str, Any], rows: list[Row], details: dict[str, Any]) -> None:
    """Everything, raw samples included, as one JSON document."""
    out = {"meta": meta, "rows": [{**dataclasses.asdict(r), "ratio": r.ratio, "ratio_of_medians": r.ratio_of_medians,
                                   "ok": r.ok} for r in rows],
           "details": {k: {**dataclasses.asdict(v), **({"same_work": v.same_work} if isinstance(v, Comparison) else {})}
                       for k, v in details.items()}}
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")
