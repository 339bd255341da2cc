"""``python -m trainer.export CHECKPOINT --format safetensors|pt2|pt [-o OUT]``: a checkpoint's model
for use outside this project.

- ``safetensors``: the weights alone (no pickle), with the class names and the config in the
  file's metadata; ``model.weights=FILE.safetensors`` fine-tunes from it.
- ``pt2``: a ``torch.export`` program (the graph and the weights, any batch size), with the class
  names and data settings inside; ``python -m trainer.predict FILE.pt2 IMAGES`` runs it without
  the model's Python code.
- ``pt``: a sharded checkpoint (a ``step_<n>/`` folder or ``last.ptr``) as one single file of
  today's form, optimizer included: it resumes (``ckpt.resume=FILE``) and reads as any ``.pt``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint, models
from trainer.config import user_code
from trainer.errors import EXIT_OK, EXIT_USER_ERROR, UserError

PROGRAM_METADATA = "launchpad.json"
"""The extra file of a ``.pt2`` program that holds the class names and the data settings."""


def export_safetensors(state: dict[str, Any], out: Path) -> None:
    """The checkpoint's model weights as safetensors; classes and config as metadata."""
    from safetensors.torch import save_file

    tensors = {key: value.detach().contiguous().clone() for key, value in state["model"].items()}
    metadata = {"classes": json.dumps(state["classes"]), "config": json.dumps(state["config"])}
    save_file(tensors, str(out), metadata=metadata)


def export_program(state: dict[str, Any], origin: Path, out: Path) -> None:
    """The checkpoint's model as a ``torch.export`` program with a dynamic batch dimension."""
    model = rebuild_model(state, origin)
    data = state["config"]["data"]
    size = data.get("val_crop_size") or data["image_size"]  # what predict's evaluation transform gives
    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    extra = {PROGRAM_METADATA: json.dumps({"classes": state["classes"], "data": state["config"]["data"],
                                           "model": state["config"]["model"]["name"],
                                           "task": state["config"].get("task", {})})}
    torch.export.save(program, str(out), extra_files=extra)


def rebuild_model(state: dict[str, Any], origin: Path, weights: str = "auto") -> torch.nn.Module:
    """The checkpoint's model (or EMA, see :func:`checkpoint.select_weights`) in eval mode on the CPU,
    built from the name its config records."""
    saved = state["config"]
    model = models.build_model(saved["model"]["name"], len(state["classes"]), saved["data"]["image_size"])
    _, chosen = checkpoint.select_weights(state, weights, origin)
    checkpoint.load_model_weights(model, chosen, origin)
    return model.eval()


def load_program(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A ``.pt2`` written by :func:`export_program`: its callable module and its metadata."""
    extra = {PROGRAM_METADATA: ""}
    torch_export_log = logging.getLogger("torch.export")  # logs a traceback before trying an older layout
    level = torch_export_log.level
    torch_export_log.setLevel(logging.ERROR)
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as exc:  # not a zip, another format, a newer torch's program
        detail = ' '.join(str(exc).split())[:200]
        if "warnings above" in detail:  # the traceback it logged is silenced
            detail = "truncated, damaged, or not a .pt2 program"
        raise UserError(f"cannot load the exported program {path} ({detail}); "
                        "export it again with python -m trainer.export CKPT --format pt2") from None
    finally:
        torch_export_log.setLevel(level)
    if not extra[PROGRAM_METADATA]:
        raise UserError(f"{path} has no {PROGRAM_METADATA}: it was not written by python -m trainer.export")
    try:
        metadata = json.loads(extra[PROGRAM_METADATA])
    except (ValueError, RecursionError):  # damaged bytes: the zip's checksums are not checked
        metadata = None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("data"), dict) \
            or not isinstance(metadata.get("classes"), list) or not isinstance(metadata.get("task", {}), dict):
        raise UserError(f"{path}: its {PROGRAM_METADATA} is damaged (no JSON object with classes and data settings); "
                        "export it again with python -m trainer.export CKPT --format pt2")
    return program.module(), metadata


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="e.g. runs/default/checkpoints/best.pt")
    parser.add_argument("--format", choices=("safetensors", "pt2", "pt"), required=True)
    parser.add_argument("-o", "--output", type=Path, help="default: the checkpoint's path with the format's suffix "
                        "(pt: NAME-single.pt, never taken for a step checkpoint of the run)")
    parser.add_argument("--code", action="append", default=[], metavar="DIR",
                        help="folder with the package of an import-path model.name (pt2)")
    args = parser.parse_args(argv)
    single = args.checkpoint.with_name(f"{args.checkpoint.stem}-single.pt")
    out = args.output or (single if args.format == "pt" else args.checkpoint.with_suffix(f".{args.format}"))
    try:
        user_code.add_code_dirs(args.code)
        state = checkpoint.load(args.checkpoint)
        if args.format == "pt":
            checkpoint.save_atomic(state, out)
        elif args.format == "safetensors":
            export_safetensors(state, out)
        else:
            export_program(state, args.checkpoint, out)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(out)
    return EXIT_OK
