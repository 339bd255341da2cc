"""Weights files: where they are, what they hold, and copying their tensors into a model.

Plain state dicts, safetensors and our checkpoints are read with ``weights_only=True``; a
torchvision weights file is fetched into ``$TORCH_HOME/hub/checkpoints`` or named exactly when it
cannot be.
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.checkpoint import digest
from trainer.errors import ConfigError, first_line
from trainer.models.deferred import copy_slices

SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def is_file_spec(weights: str) -> bool:
    """Whether ``model.weights`` names a file (a path, a weights-file suffix, an existing file)
    rather than a torchvision or timm weights name."""
    return os.sep in weights or "/" in weights or weights.lower().endswith(SUFFIXES) \
        or Path(weights).expanduser().is_file()


def torchvision_file(weights: Any) -> Path:
    """torchvision's weights file in ``$TORCH_HOME/hub/checkpoints``, downloaded if absent and possible."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not path.is_file():
        try:
            torch.hub.download_url_to_file(weights.url, str(path), progress=False)
        except (OSError, ValueError) as exc:  # URLError (no network, proxy), HTTP errors, disk full
            raise ConfigError(f"model.weights: {path} is missing and could not be downloaded ({first_line(exc)}); "
                              f"download {weights.url} on a machine with network and put it at that path "
                              "(it is $TORCH_HOME/hub/checkpoints/)") from None
    return path


def read_weight_file(path: Path, mapped: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from ``path``: safetensors, a plain state dict, or one of our checkpoints
    (its ``model`` entry); loaded with ``weights_only=True``, wrapper prefixes removed. ``mapped``:
    the tensors are views of the memory-mapped file, read only where they are used (a sharded
    model reads each rank's slices)."""
    if not path.is_file():
        raise ConfigError(f"model.weights: file '{path}' not found; give a state dict or checkpoint path, "
                          "a torchvision weights name (DEFAULT...), or none")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = _mapped_safetensors(path) if mapped else load_file(str(path))
        else:
            state = _torch_load(path, mapped)
    except pickle.UnpicklingError as exc:
        if "Unsupported operand" in str(exc):  # bytes that are no pickle stream at all
            raise ConfigError(f"model.weights: '{path}' is not a weights file (truncated, or another format); "
                              "give a state dict saved with torch.save, a .safetensors file or a checkpoint") from None
        raise ConfigError(f"model.weights: refusing '{path}': it holds pickled Python objects, not only tensors; "
                          "re-save it with torch.save(model.state_dict())") from None
    except Exception as exc:  # truncated zips, headers that are not safetensors
        raise ConfigError(f"model.weights: cannot read '{path}' as weights ({first_line(exc)}); "
                          "give a state dict saved with torch.save, a .safetensors file or a checkpoint") from None
    if isinstance(state, dict) and not digest.matches(state):  # one of our checkpoints, damaged
        raise ConfigError(f"model.weights: checkpoint '{path}' is damaged: its contents do not match its "
                          "digest; use another checkpoint")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    tensors = {strip_wrappers(k): v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)} \
        if isinstance(state, dict) else {}
    if not tensors:
        raise ConfigError(f"model.weights: '{path}' holds no tensors; give a state dict or a checkpoint")
    return tensors


def _torch_load(path: Path, mapped: bool) -> Any:
    if mapped:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # a file of torch's legacy format cannot be mapped: read whole
            if "mmap" not in str(exc):
                raise
    return torch.load(path, map_location="cpu", weights_only=True)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def _mapped_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of its mapping (copy-on-write: nothing is read
    until used, nothing is written back). The format: an 8-byte header length, a JSON header of
    each tensor's dtype, shape and byte range, the data."""
    with open(path, "rb") as file:
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    length = int.from_bytes(mapping[:8], "little")
    header = json.loads(mapping[8:8 + length])
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        data = torch.frombuffer(mapping, dtype=torch.uint8, count=end - start, offset=8 + length + start) \
            if end > start else torch.empty(0, dtype=torch.uint8)
        tensors[name] = data.view(dtype).reshape(entry["shape"])
    return tensors


def strip_wrappers(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], origin: str, into_shards: bool = False) -> str:
    """Copy every tensor whose name and shape match; keep the model's own (fresh) tensors where
    the shape differs (the classifier head, for another class count). ``into_shards``: the model
    is sharded, each rank copies its slice of each tensor. Returns the report line."""
    own = model.state_dict(keep_vars=into_shards)
    loaded = {k: v for k, v in tensors.items() if k in own and v.shape == own[k].shape}
    replaced = sorted(k for k in tensors if k in own and k not in loaded)
    missing = sorted(k for k in own if k not in tensors)
    unused = sorted(k for k in tensors if k not in own)
    if not loaded:
        raise ConfigError(f"model.weights: no tensor of '{origin}' matches the model (theirs: "
                          f"{', '.join(list(tensors)[:3])}...; ours: {', '.join(list(own)[:3])}...); "
                          "check model.name")
    try:
        if into_shards:
            copy_slices(own, loaded)
        else:
            model.load_state_dict(loaded, strict=False)
    except RuntimeError as exc:  # a tensor whose dtype cannot become the parameter's (complex into float)
        raise ConfigError(f"model.weights: cannot copy the tensors of '{origin}' into the model "
                          f"({first_line(exc)}); check that the file holds this model's weights") from None

    def listed(keys: list[str], why: str = "") -> str:
        return f" ({why}{', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''})" if keys else ""

    return (f"model.weights={origin}: {len(loaded)} tensors loaded{' (each rank its slices)' if into_shards else ''}, "
            f"{len(replaced)} replaced"
            f"{listed(replaced, 'shape differs: ')}, {len(missing)} missing{listed(missing)}, "
            f"{len(unused)} unused{listed(unused)}")


def checkpoint_data_settings(path: Path) -> dict[str, Any]:
    """One of our checkpoints knows the data settings its model was trained with."""
    if not path.is_file() or path.suffix == ".safetensors":
        return {}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # reported, with its cause, when the weights are loaded
        return {}
    saved = state.get("config") if isinstance(state, dict) else None
    saved = saved.get("data") if isinstance(saved, dict) else None
    keys = ("mean", "std", "image_size", "val_crop_fraction")
    return {f"data.{k}": saved[k] for k in keys if k in saved} if isinstance(saved, dict) else {}
