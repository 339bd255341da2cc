"""What this process uses of the machine: usable CPU cores and peak memory per epoch, per platform."""

from __future__ import annotations

import resource
import sys
from typing import Any, Iterable

import torch


def max_rss_mb() -> float:
    """Peak resident memory of this process so far (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class PeakMemory:
    """Peak device memory of one epoch: on CUDA the memory the caching allocator reserved (what
    competes with other processes) and its allocation retries (a sign of fragmentation near the
    limit), both counted from :meth:`reset`; on MPS, which keeps no peak, the driver's allocation
    at the epoch's end; on a CPU the process's peak resident memory so far."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._retries_before = 0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._retries_before = torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0)

    def read(self) -> dict[str, float]:
        """``peak_mem_mb`` (and, on CUDA, ``alloc_retries``) since the last :meth:`reset`."""
        if self.device.type == "cuda":
            retries = torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0) - self._retries_before
            return {"peak_mem_mb": torch.cuda.max_memory_reserved(self.device) / 2**20,
                    "alloc_retries": float(retries)}
        if self.device.type == "mps":
            return {"peak_mem_mb": torch.mps.driver_allocated_memory() / 2**20}
        return {"peak_mem_mb": max_rss_mb()}


def model_memory_mb(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """What this rank holds of the model's training state, in MB: its parameters, the gradients of
    the trainable ones (as large as those, from the backward to the optimizer step) and the
    optimizer's state (from its first step on). A sharded tensor counts its local shard only."""
    def mb(tensors: Iterable[Any]) -> float:
        total = 0
        for tensor in tensors:
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            if isinstance(local, torch.Tensor):
                total += local.numel() * local.element_size()
        return total / 2**20

    parameters = list(model.parameters())
    return {"memory/parameters_mb": mb(parameters),
            "memory/gradients_mb": mb(p for p in parameters if p.requires_grad),
            "memory/optimizer_mb": mb(v for state in optimizer.state.values() for v in state.values())}
