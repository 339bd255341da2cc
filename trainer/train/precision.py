"""Mixed precision: which autocast dtype and whether a GradScaler is needed, per device."""

from __future__ import annotations

import os
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
    """``auto``: bf16 where the device computes it natively, else fp16 with a scaler on CUDA, else fp32.

    CUDA computes bf16 natively from compute capability 8.0 (Ampere) on; before that it is
    emulated and slow, so ``auto`` takes fp16 with a GradScaler there. MPS has bf16 from macOS 14.
    fp16 always comes with a GradScaler on accelerators (it underflows without one); CPU autocast
    supports only bf16.
    """
    kind = device.type
    if requested == "auto":
        native_bf16 = {"cuda": _cuda_native_bf16, "mps": _mps_bf16}.get(kind, lambda _: False)(device)
        requested = "bf16" if native_bf16 else "fp16" if kind == "cuda" else "fp32"
    if requested == "fp32":
        return Precision("fp32", None, False)
    if requested == "fp16" and kind == "cpu":
        raise ConfigError("train.precision=fp16: CPU autocast supports only bf16; use bf16 or fp32")
    if requested == "bf16" and kind == "cuda" and not _cuda_native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(f"train.precision=bf16: this GPU (compute capability {major}.{minor}) only emulates "
                          "bf16, slowly; use fp16 or auto")
    if requested == "bf16" and kind == "mps" and not _mps_bf16(device):
        raise ConfigError("train.precision=bf16: MPS supports bf16 from macOS 14 on; use fp32 or fp16")
    dtype = torch.bfloat16 if requested == "bf16" else torch.float16
    return Precision(requested, dtype, scaled=requested == "fp16" and kind in ("cuda", "mps"))


def _cuda_native_bf16(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _mps_bf16(device: torch.device) -> bool:
    return torch.backends.mps.is_macos_or_newer(14, 0)


def configure_cuda_math(cudnn_benchmark: bool, tf32: bool, deterministic: bool) -> None:
    """cuDNN autotuning and TF32 tensor-core math for fp32 matmuls and convolutions (CUDA only).

    ``deterministic`` turns autotuning off (it may pick another algorithm on the next run) and asks
    for deterministic kernels. Ops that have none only warn (``warn_only``): ResNet's global
    average pool, for one, is flagged although each input element receives a single gradient.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = cudnn_benchmark and not deterministic
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
