"""Mixed precision: which autocast dtype and whether a GradScaler is needed, per device."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from trainer.errors import ConfigError


@dataclass(frozen=True)
class Precision:
    """The resolved ``train.precision``: autocast dtype (None = fp32) and GradScaler use."""

    name: str
    dtype: torch.dtype | None
    scaled: bool

    def autocast(self, device: torch.device) -> AbstractContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


def resolve(requested: str, device: torch.device) -> Precision:
    """``auto``: bf16 on CUDA that supports it, else fp16 with a scaler; fp16 on MPS; fp32 on CPU."""
    kind = device.type
    if requested == "auto":
        if kind == "cuda":
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            requested = "fp16" if kind == "mps" else "fp32"
    if requested == "fp32":
        return Precision("fp32", None, False)
    if requested == "fp16" and kind == "cpu":
        raise ConfigError("train.precision=fp16: CPU autocast supports only bf16; use bf16 or fp32")
    if requested == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision=bf16: this GPU has no bf16 support; use fp16 or auto")
    dtype = torch.bfloat16 if requested == "bf16" else torch.float16
    return Precision(requested, dtype, scaled=requested == "fp16" and kind == "cuda")


def configure_cuda_math(cudnn_benchmark: bool, tf32: bool) -> None:
    """cuDNN autotuning and TF32 tensor-core math for fp32 matmuls and convolutions (CUDA only)."""
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
