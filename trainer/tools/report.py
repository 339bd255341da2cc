"""``python -m trainer.report RUN_DIR... [--plot curves.png]``: compare finished or running runs.

Prints one row per run: epochs, final and best validation metrics, training images/s, the
micro-batch a ``train.micro_batch=auto`` run settled on (when one is compared), and the config keys
whose values differ between the runs. ``--plot`` draws their validation curves.
Reads only ``metrics.jsonl`` and ``config.yaml`` of each run directory; writes nothing else.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from trainer.config import flatten
from trainer.errors import EXIT_OK, EXIT_USER_ERROR, UserError

IGNORED_KEYS = ("log.name", "log.output_dir")
"""Config keys that differ between any two runs and say nothing about them."""


@dataclass
class Run:
    """One run directory's epoch records and flattened resolved config."""

    path: Path
    records: list[dict[str, Any]]
    config: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    def values(self, key: str) -> tuple[list[float], list[float]]:
        """(epochs, values) of ``key`` over the epochs that logged it."""
        points = [(r.get("epoch", number), _float(r.get(key))) for number, r in enumerate(self.records, start=1)]
        return [e for e, v in points if v is not None], [v for _, v in points if v is not None]


def load_run(path: Path) -> Run:
    """Read a run directory; a UserError names what is missing or unreadable."""
    metrics, settings = path / "metrics.jsonl", path / "config.yaml"
    if not metrics.is_file():
        raise UserError(f"{path} has no metrics.jsonl: not a run directory, or no epoch finished yet "
                        "(runs need log.trackers to include jsonl)")
    records = []
    for number, line in enumerate(_text(metrics).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, RecursionError) as exc:
            raise UserError(f"{metrics} line {number} is not JSON ({getattr(exc, 'msg', exc)}); "
                            "was it cut by a full disk?") from None
        if not isinstance(records[-1], dict):
            raise UserError(f"{metrics} line {number} is not a JSON object of metrics; is it a metrics.jsonl?")
    if not records:
        raise UserError(f"{metrics} is empty: no epoch finished yet")
    return Run(path, records, _config(settings) if settings.is_file() else {})


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path} ({' '.join(str(exc).split())}); "
                        "a run writes it as UTF-8 text: restore it or leave the run out") from None


def _config(settings: Path) -> dict[str, Any]:
    """The run's config.yaml as flat ``section.key`` keys."""
    try:
        tree = yaml.safe_load(_text(settings))
    except yaml.YAMLError as exc:
        raise UserError(f"{settings} is not valid YAML ({' '.join(str(exc).split())}); "
                        "restore it or delete it (the report then shows no config keys)") from None
    if tree is not None and not isinstance(tree, dict):
        raise UserError(f"{settings} holds a {type(tree).__name__}, not the keys of a config; "
                        "restore it or delete it (the report then shows no config keys)")
    return {str(key): value for key, value in flatten(tree or {}).items()}


def differing_keys(runs: list[Run]) -> list[str]:
    """Config keys whose values are not the same in every run (a key absent counts as a value)."""
    keys = sorted({key for run in runs for key in run.config} - set(IGNORED_KEYS))
    return [key for key in keys if len({json.dumps(run.config.get(key), default=str) for run in runs}) > 1]


def best(run: Run, metric: str, mode: str) -> tuple[float, int] | None:
    epochs, values = run.values(metric)
    if not values:
        return None
    pick = max if mode == "max" else min
    value = pick(values)
    return value, epochs[values.index(value)]


def table(runs: list[Run], metric: str, mode: str) -> str:
    """The comparison as aligned plain-text columns."""
    differing = differing_keys(runs)
    cut = any("train/micro_batch" in run.records[-1] for run in runs)
    header = ["run", "epochs", "val/top1", "val/loss", f"best {metric}", "images/s", *(["micro-batch"] if cut else []),
              *differing]
    rows = [header]
    for run in runs:
        last = run.records[-1]
        found = best(run, metric, mode)
        speeds = [v for v in run.values("train/images_per_s")[1] if v == v]
        rows.append([run.name, str(last.get("epoch", len(run.records))), _number(last.get("val/top1")),
                     _number(last.get("val/loss")), f"{found[0]:.4f} (epoch {found[1]})" if found else "-",
                     f"{statistics.median(speeds):.0f}" if speeds else "-", *([micro_batch(run)] if cut else []),
                     *(_value(run.config.get(key)) for key in differing)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def micro_batch(run: Run) -> str:
    """Samples per forward x forwards per optimizer step at the run's end: what
    ``train.micro_batch=auto`` settled on (and validation's), else the configured ones."""
    last = run.records[-1]
    if "train/micro_batch" in last:
        return (f"{last['train/micro_batch']} x {last.get('train/micro_batches_per_step', '?')} "
                f"(val {last.get('train/val_micro_batch', '?')})")
    return f"{run.config.get('data.batch_size', '?')} x {run.config.get('train.grad_accum_steps', 1)}"


def plot(runs: list[Run], metric: str, out: Path) -> None:
    """Validation curves (top-1, loss and ``metric``) of every run, one panel each, as a PNG."""
    from trainer.observe.pictures import Panel, line_chart

    keys = list(dict.fromkeys(["val/top1", "val/loss", metric]))
    panels = [Panel(key, "epoch", {run.name: run.values(key) for run in runs}) for key in keys]
    try:
        line_chart(panels).save(out, format="PNG")
    except OSError as exc:
        raise UserError(f"cannot write the plot to {out} ({exc.strerror or exc}); choose a writable path") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="e.g. runs/baseline runs/lr0.05")
    parser.add_argument("--metric", help="the metric of the 'best' column (default: the first run's ckpt.metric)")
    parser.add_argument("--mode", choices=("max", "min"), help="max or min is best (default: from the first run)")
    parser.add_argument("--plot", type=Path, metavar="OUT.png", help="also draw the validation curves into a PNG")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(path) for path in args.runs]
        first = runs[0].config
        metric = args.metric or str(first.get("ckpt.metric", "val/top1"))
        same_metric = metric == first.get("ckpt.metric", "val/top1")
        mode = args.mode or (first.get("ckpt.mode", "max") if same_metric else "min" if "loss" in metric else "max")
        print(table(runs, metric, mode))
        if args.plot is not None:
            plot(runs, metric, args.plot)
            print(f"plot: {args.plot}")
        return EXIT_OK
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


def _float(value: Any) -> float | None:
    """A logged number as a float; None for anything else (a string, a bool, an int beyond floats)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def _number(value: Any) -> str:
    number = _float(value)
    return "-" if number is None else f"{number:.4f}"


def _value(value: Any) -> str:
    return "-" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
