"""One epoch's training loss, summed on the host in order: no op and no host sync per step."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class TrainMeter:
    """One epoch's training loss: no op and no host sync per step, no float64 on the device (MPS has none).

    Step losses (the 0-d tensors the step computed anyway) collect in a list. Every ``window``
    steps or so, :meth:`flush` reads them in one transfer and adds them to the epoch's sum, a
    float64 on the host, in order: the sum does not depend on where windows were cut (a resume
    cuts one).
    """

    def __init__(self, window: int) -> None:
        self.loss_sum = 0.0
        self.count = 0
        self.window = window
        self.losses: list[torch.Tensor] = []
        self.window_sizes: list[int] = []
        self.window_steps: list[int] = []
        self.pending_bad_step: int | None = None  # found by an automatic flush, reported by the next flush()

    def update(self, loss: torch.Tensor, batch_size: int, step: int) -> None:
        """Record one batch's mean loss (a 0-d tensor); flushes by itself when the window is full."""
        if len(self.losses) == self.window:
            self.pending_bad_step = self.flush()
        self.losses.append(loss.detach() if loss.requires_grad else loss)
        self.window_sizes.append(batch_size)
        self.window_steps.append(step)

    def flush(self) -> int | None:
        """Fold the window into the sum; return the step of the first non-finite loss, if any."""
        pending, self.pending_bad_step = self.pending_bad_step, None
        if not self.losses:
            return pending
        losses = torch.stack(self.losses).float().tolist()  # the window's one host transfer
        for loss, size in zip(losses, self.window_sizes):  # in float64, one by one: the same sum
            self.loss_sum += loss * size                    # however the epoch was cut into windows
        self.count += sum(self.window_sizes)
        steps = self.window_steps[:]
        self.losses.clear()
        self.window_sizes.clear()
        self.window_steps.clear()
        if pending is not None:
            return pending
        return next((step for step, loss in zip(steps, losses) if not math.isfinite(loss)), None)

    def mean_loss(self) -> float:
        """This rank's mean loss so far (flush first)."""
        return self.loss_sum / max(self.count, 1)

    def state(self) -> torch.Tensor:
        """Loss sum and count as a CPU tensor (flush first)."""
        return torch.tensor([self.loss_sum, float(self.count)], dtype=torch.float64)

    def load_state(self, state: torch.Tensor) -> None:
        self.loss_sum, self.count = float(state[0]), int(state[1])

    def reduce(self, group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """Mean loss and sample count over all ranks (flush first; a collective: every rank must call it).

        The sums are host values, so ``group`` is best the CPU (gloo) control group.
        """
        sums = torch.tensor([self.loss_sum, float(self.count)], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(sums, group=group)
        loss_sum, count = sums.tolist()
        return {"loss": loss_sum / max(count, 1.0), "samples": int(count)}
