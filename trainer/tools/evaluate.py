"""``python -m trainer.evaluate CHECKPOINT [key=value ...]``: validation metrics of a checkpoint.

The data, model and train settings start from those saved in the checkpoint, then ``-c`` files,
then overrides (e.g. another ``data.root``). Only the validation split is read. Runs under any
launcher like the trainer itself (every sample counted once across ranks) and prints one JSON
line of metrics on rank 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint, config, models
from trainer.config import user_code
from trainer.data import loaders, sources
from trainer.data.stages import DeviceStages, Normalize
from trainer.errors import EXIT_OK, EXIT_USER_ERROR, UserError, one_line
from trainer.observe.console import setup_console
from trainer.parallel import distributed
from trainer.train import precision
from trainer.tasks.registry import build_task
from trainer.train.evaluation import evaluate_model

MODEL_SECTIONS = ("data", "task", "model", "train")
"""The parts of a checkpoint's saved config that evaluation starts from (not dist, log or ckpt)."""


class _KeepMeter:
    """An evaluation observer that keeps the reduced meter, for the per-class rows."""

    meter: Any = None

    def update(self, images: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        pass

    def finish(self, meter: Any) -> None:
        self.meter = meter


def evaluate_checkpoint(cfg: config.Config, env: distributed.DistEnv, state: dict[str, Any],
                        origin: Path, weights: str = "auto") -> dict[str, Any]:
    """Metrics of the checkpoint's model (or EMA) weights on the validation split of ``cfg.data``,
    with the task's per-class rows under ``per_class``.

    On a CPU it computes in fp32 whatever the training precision (CPU autocast has no fp16).
    """
    task = build_task(cfg)
    splits = sources.prepared_splits(cfg.data, env, multi_hot=task.target_form == "multi_hot")
    checkpoint.check_classes(state, splits.classes, origin)
    _, chosen = checkpoint.select_weights(state, weights, origin)
    model = models.build_model(cfg.model.name, len(splits.classes), cfg.data.image_size)
    checkpoint.load_model_weights(model, chosen, origin)
    memory_format = models.memory_format(cfg.model.channels_last)
    model.to(env.device, memory_format=memory_format)
    loader = loaders.build_val_loader(splits.val, cfg.data, env.world_size, env.rank, env.device, cfg.train.seed)
    autocast = precision.resolve("fp32" if env.device.type == "cpu" else cfg.train.precision, env.device)
    stages = DeviceStages(Normalize(cfg.data.mean, cfg.data.std, env.device), env.device, cfg.train.seed, memory_format)
    kept = _KeepMeter()
    metrics, _ = evaluate_model(model, loader, task, len(splits.classes), stages, autocast, env.control,
                                observer=kept)
    return {**metrics, "per_class": kept.meter.rows(splits.classes)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="e.g. runs/default/checkpoints/best.pt")
    parser.add_argument("-c", "--config", action="append", default=[], metavar="FILE.yaml")
    parser.add_argument("--weights", choices=checkpoint.WEIGHTS, default="auto",
                        help="the trained weights or their EMA (auto: the EMA when best.pt was chosen on val_ema/)")
    parser.add_argument("--code", action="append", default=[], metavar="DIR",
                        help="folder with the package of an import-path model.name or data.source")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)  # options after overrides too
    topology = distributed.discover()
    setup_console(topology.rank)
    try:
        user_code.add_code_dirs(args.code)
        state = checkpoint.load(args.checkpoint)
        saved = state.get("config") or {}  # what the model was trained on; not where or how it ran
        base = {section: saved[section] for section in MODEL_SECTIONS if section in saved}
        cfg = config.load(args.config, args.overrides, base=base)
        env = distributed.setup(cfg.dist.device, cfg.dist.backend, cfg.dist.timeout_s)
        metrics = evaluate_checkpoint(cfg, env, state, args.checkpoint, args.weights)
        if env.is_main:
            print(json.dumps(metrics), flush=True)
        distributed.teardown(env)
        return EXIT_OK
    except UserError as exc:
        if topology.rank == 0:
            print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
