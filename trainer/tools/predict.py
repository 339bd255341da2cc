"""``python -m trainer.predict CHECKPOINT IMAGE_OR_FOLDER...``: classify images on the CPU.

``CHECKPOINT`` is one of our checkpoints, or a ``.pt2`` program written by ``trainer.export``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from trainer import checkpoint, config
from trainer.config import DataConfig, user_code
from trainer.data import loaders
from trainer.data.stages import Normalize
from trainer.errors import EXIT_FAILURE, EXIT_OK, EXIT_USER_ERROR, CheckpointError, ConfigError, UserError, first_line
from trainer.tasks.registry import build_task
from trainer.tools import export


class Predictor:
    """A trained model on the CPU with its validation transform and class names."""

    def __init__(self, checkpoint_path: Path, weights: str = "auto") -> None:
        if checkpoint_path.suffix == ".pt2":
            self.model, saved = export.load_program(checkpoint_path)
            saved_data, saved_config = saved["data"], {"task": saved.get("task", {})}
        else:
            state = checkpoint.load(checkpoint_path)
            if not isinstance(state.get("config"), dict) or not isinstance(state["config"].get("data"), dict) \
                    or not isinstance(state.get("classes"), list):
                raise CheckpointError(f"{checkpoint_path} is not a checkpoint of this trainer (no saved config or classes)")
            saved, saved_data, saved_config = state, state["config"]["data"], state["config"]
        self.classes: list[str] = saved["classes"]
        try:  # what the file says it was trained with: checked like any config
            self.task = build_task(config.load(base={key: saved_config[key] for key in ("task", "train")
                                                     if key in saved_config}))
            data_cfg: DataConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig),
                                                                       saved_data))  # type: ignore[assignment]
        except (ConfigError, OmegaConfBaseException) as exc:
            raise UserError(f"{checkpoint_path} holds settings this version cannot use ({first_line(exc)}); "
                            "export or train it again") from None
        if checkpoint_path.suffix != ".pt2":
            self.model = export.rebuild_model(state, checkpoint_path, weights)
        self.transform = loaders.build_transform(data_cfg, train=False)
        self.normalize = Normalize(data_cfg.mean, data_cfg.std, torch.device("cpu"))

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """The model's input for one image: (1, 3, H, W) floats, transformed and normalised as in validation."""
        return self.normalize(self.transform(image).unsqueeze(0))

    @torch.inference_mode()
    def probabilities(self, image: Image.Image) -> torch.Tensor:
        """Class probabilities for one image (the task's: softmax, or a sigmoid per label)."""
        return self.task.probabilities(self.model(self.prepare(image)))[0]

    def top(self, image: Image.Image, k: int) -> list[tuple[str, float]]:
        probs = self.probabilities(image)
        values, indices = probs.topk(min(k, len(self.classes)))
        return [(self.classes[i], v) for i, v in zip(indices.tolist(), values.tolist())]


def image_files(paths: list[Path]) -> Iterator[Path]:
    """The given files, and every image file under the given folders (sorted)."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
        else:
            yield path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.predict",
                                     description="Classify images with a trained checkpoint (runs on CPU).")
    parser.add_argument("checkpoint", type=Path, help="e.g. runs/default/checkpoints/best.pt")
    parser.add_argument("paths", type=Path, nargs="+", help="image files or folders of images")
    parser.add_argument("-k", "--top-k", type=int, default=3, help="classes to print per image")
    parser.add_argument("--weights", choices=checkpoint.WEIGHTS, default="auto",
                        help="the trained weights or their EMA (auto: the EMA when best.pt was chosen on val_ema/)")
    parser.add_argument("--code", action="append", default=[], metavar="DIR",
                        help="folder with the package of an import-path model.name")
    args = parser.parse_args(argv)
    try:
        user_code.add_code_dirs(args.code)
        predictor = Predictor(args.checkpoint, args.weights)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    failures, seen = 0, 0
    for path in image_files(args.paths):
        seen += 1
        try:
            with Image.open(path) as image:
                ranked = predictor.top(image, args.top_k)
        except (OSError, SyntaxError, ValueError) as exc:
            failures += 1
            print(f"error: cannot classify {path}: {exc}", file=sys.stderr)
            continue
        print(f"{path}\t" + "  ".join(f"{name} {p:.3f}" for name, p in ranked))
    if seen == 0:
        print(f"error: no image files found in {', '.join(map(str, args.paths))}", file=sys.stderr)
        return EXIT_USER_ERROR
    return EXIT_FAILURE if failures else EXIT_OK
