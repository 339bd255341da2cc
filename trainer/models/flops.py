"""How much arithmetic the model does per image, and how close a run comes to the device's peak."""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

log = logging.getLogger("trainer")

TRAINING_PER_FORWARD = 3
"""Training FLOPs per forward FLOP: the backward pass costs about two forwards (input and weight
gradients); the usual convention for MFU."""

PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 75.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "GH200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "T4": {"fp16": 65.0, "fp32": 8.1},
}
"""Dense tensor-core peaks per GPU (NVIDIA datasheets, no sparsity), matched as whole words of
the device name, longest key first ("H100 PCIe" before "H100"; "L4" is not "L40S")."""


def training_flops_per_image(model: nn.Module, image_size: int) -> float | None:
    """Forward FLOPs of one image x :data:`TRAINING_PER_FORWARD`, counted by ``FlopCounterMode``.

    The forward runs on the meta device, with shape-only stand-ins for the weights: no memory,
    no arithmetic, nothing in the model changes. None if the model cannot run that way.
    """
    from torch.func import functional_call
    from torch.utils.flop_counter import FlopCounterMode

    stand_ins = {name: torch.empty_like(tensor, device="meta")
                 for name, tensor in [*model.named_parameters(), *model.named_buffers()]}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            functional_call(model, stand_ins, (torch.empty(1, 3, image_size, image_size, device="meta"),))
    except Exception as exc:  # noqa: BLE001 - data-dependent models (.item(), numpy) cannot run on meta
        log.debug("FLOPs not counted: %s", exc)
        return None
    finally:
        model.train(was_training)
    return float(counter.get_total_flops() * TRAINING_PER_FORWARD)


def peak_tflops(device: torch.device, precision: str, tf32: bool, override: float = 0.0) -> float | None:
    """The peak TFLOP/s of one device for this precision (``override`` if set); None on CPU or an
    unknown GPU."""
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    major, _ = torch.cuda.get_device_capability(device)
    kind = "tf32" if precision == "fp32" and tf32 and major >= 8 else precision
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if re.search(rf"\b{re.escape(key)}\b", name):
            return PEAK_TFLOPS[key].get(kind)
    return None


def throughput(flops_per_image: float | None, images_per_s: float, peak: float | None,
               world_size: int) -> dict[str, float]:
    """``train/tflops`` achieved by the whole job and, given a per-device peak, ``train/mfu``."""
    if flops_per_image is None:
        return {}
    achieved = flops_per_image * images_per_s / 1e12
    perf = {"train/tflops": achieved}
    if peak:
        perf["train/mfu"] = achieved / (peak * world_size)
    return perf


def short(value: float | None) -> str:
    """``1.23G`` for 1.23e9; ``?`` when unknown."""
    if value is None:
        return "?"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"
