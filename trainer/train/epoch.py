"""One training epoch: micro-batches through the device stages into the step, accumulation
windows, the learning rate from progress, the running loss, and, at optimizer-step boundaries,
the agreed stop and the timed saves."""

from __future__ import annotations

import time
from typing import Callable

import torch

from trainer import STARTED
from trainer.checkpoint import RankSums
from trainer.config import Config
from trainer.data.loaders import Position
from trainer.data.stages import DeviceStages
from trainer.errors import NonFiniteLoss, OutOfMemory
from trainer.observe.console import ProgressBar, log
from trainer.observe.memory import PeakMemory
from trainer.observe.profiling import StepProfiler
from trainer.observe.sinks import MetricSinks
from trainer.observe.stragglers import StragglerWatch
from trainer.parallel import hangs
from trainer.parallel.distributed import DistEnv
from trainer.train.inputs import Inputs
from trainer.train.meter import TrainMeter
from trainer.train.micro_batch import BackwardOutOfMemory
from trainer.train.optim import Schedule
from trainer.train.records import RunRecord
from trainer.train.step import TrainStep
from trainer.train.stopping import StopPolicy


class EpochLoop:
    """Trains the rest of an epoch from a global position; owns the epoch's loss meter and the
    count of unreadable samples skipped on this rank."""

    def __init__(self, cfg: Config, env: DistEnv, inputs: Inputs, stages: DeviceStages, step: TrainStep,
                 schedule: Schedule, record: RunRecord, policy: StopPolicy, sinks: MetricSinks,
                 profiler: StepProfiler, save: Callable[[], None], stragglers: StragglerWatch | None = None) -> None:
        self.cfg, self.env, self.inputs, self.stages, self.step = cfg, env, inputs, stages, step
        self.schedule, self.record, self.policy, self.sinks, self.profiler = schedule, record, policy, sinks, profiler
        self.save, self.stragglers = save, stragglers
        self.meter = TrainMeter(cfg.log.every_steps)
        self.peak_memory = PeakMemory(env.device)
        self.skipped_samples = 0
        self.stepped = False  # an optimizer step has finished in this process

    def run(self, position: Position) -> dict[str, float] | None:
        """The rest of the epoch's global order, from ``position`` on (advanced as it goes); None if
        a stop was requested.

        Accumulation windows count from the first micro-batch trained here; the epoch's last
        window may be shorter, and its loss is divided by its real number of micro-batches. Ranks
        agree on stopping (and on timed saves) at every optimizer step, one step late (see
        :class:`trainer.parallel.distributed.LaggedAgreement`), and once more after the last batch.
        """
        stats = self._run(position)
        # Validation, pictures and checkpoints follow: ranks may arrive far apart. (A failed
        # collective leaves the steady timeout in place: its verdict names the timeout it waited.)
        hangs.set_timeout(self.env, self.cfg.dist.timeout_s)
        return stats

    def _run(self, position: Position) -> dict[str, float] | None:
        cfg, accum, sampler = self.cfg, self.cfg.train.grad_accum_steps, self.inputs.sampler
        if self.stepped:
            hangs.set_timeout(self.env, cfg.dist.step_timeout_s)
        self.step.net.train()
        sampler.set_position(position)
        global_batches = sampler.global_batches()
        if position.consumed == 0:
            self.meter = TrainMeter(cfg.log.every_steps)
        self.peak_memory.reset()
        bar = ProgressBar(self.env, cfg.log.progress_bar, len(global_batches), f"epoch {position.epoch + 1}")
        # The loader starts its workers at the first batch: their start-up counts as waiting for data,
        # as images/s counts it.
        started, waited, consumed_before = time.perf_counter(), 0.0, position.consumed
        window_start = position.consumed  # where the current accumulation window began
        feed = self.stages.batches(self.inputs.train_loader)
        batches, decoder = iter(feed), self.stages.decoder
        served, on_cpu = (decoder.samples, decoder.cpu_decoded) if decoder is not None else (0, 0)
        own_time = self.stragglers.clock if self.stragglers is not None else None
        for index, global_size in enumerate(global_batches):
            self.profiler.update(self.record.global_step)
            hangs.TRAIL.at("data", self.record.global_step + 1)
            wait_start, decoding = time.perf_counter(), feed.decoding
            batch = next(batches)
            wait = time.perf_counter() - wait_start - (feed.decoding - decoding)  # the loader's part
            waited += wait
            if own_time is not None:
                own_time.waited(wait)
                own_time.micro_batch_starts()
            hangs.TRAIL.at("step", self.record.global_step + 1)
            self.skipped_samples += batch.skipped
            if index % accum == 0:
                window_start = position.consumed
            window = min(accum, len(global_batches) - (index - index % accum))
            boundary = (index + 1) % accum == 0 or index + 1 == len(global_batches)
            batch, stand_in = self.inputs.stand_in.swap(batch)
            images, targets = self.stages(batch, position.epoch, position.consumed, self.env.rank)
            position.consumed += global_size
            if boundary:
                done = position.epochs_done(sampler.size)
                self.schedule.set_window(position.epoch + window_start / sampler.size, done)
            loss = self._train_step(images, targets, window, boundary, stand_in)
            if own_time is not None:
                own_time.micro_batch_ends(boundary)
            if not stand_in:
                self.meter.update(loss, targets.shape[0], self.record.global_step)
            bar.update()
            if boundary and self.record.global_step % cfg.log.every_steps == 0:
                self.flush_meter(position.epoch)
                running = self.meter.mean_loss()
                bar.set_postfix(loss=f"{running:.4f}")
                scalars = {"train/loss_running": running, "train/lr": self.schedule.lr()}
                if self.stragglers is not None:  # a collective, after the meter's read of the device
                    scalars.update(self.stragglers.report(self.record.global_step))
                self.sinks.scalars(scalars, self.record.global_step)
            if boundary and index + 1 < len(global_batches):
                hangs.TRAIL.at("agreement", self.record.global_step)
                stop, save = self.policy.poll(self.record.global_step)
                if stop:
                    bar.close()
                    return None
                if save:
                    with hangs.patient(self.env, self.cfg.dist.timeout_s, self.cfg.dist.step_timeout_s):
                        self.save()
        bar.close()
        hangs.TRAIL.at("agreement", self.record.global_step)
        self.policy.agreement.settle(2)
        if self.policy.requested_anywhere():
            return None
        self.flush_meter(position.epoch)
        elapsed = time.perf_counter() - started
        stats = self.meter.reduce(self.env.control)
        stats.update(images_per_s=(position.consumed - consumed_before) / elapsed, data_wait=waited / elapsed,
                     time_s=elapsed)
        if decoder is not None:  # the main process's time spent decoding (not counted in data_wait)
            stats["decode_time_s"] = feed.decoding
            if on_cpu := decoder.cpu_decoded - on_cpu:
                log.info("epoch %d: %d of %d samples decoded on the CPU, not the device (not an RGB JPEG, or the "
                         "device decoder refused it; data.decode=%s)", position.epoch + 1, on_cpu,
                         decoder.samples - served, cfg.data.decode)
        return stats

    def _train_step(self, images: torch.Tensor, targets: torch.Tensor, window: int, last: bool,
                    stand_in: bool = False) -> torch.Tensor:
        """:meth:`TrainStep.micro_batch`, with a running out of memory turned into the one-line hint."""
        try:
            loss = self.step.micro_batch(images, targets, window, last, stand_in)
        except torch.OutOfMemoryError:
            raise OutOfMemory(self._out_of_memory()) from None
        except BackwardOutOfMemory:
            size, half = self.step.cut.size, self.step.micro_batches.write_note()
            raise OutOfMemory(f"{self._out_of_memory()}; train.micro_batch=auto: the backward pass ran out at "
                              f"micro-batch {size}, the next start of this run uses {half}") from None
        if last:
            self.record.global_step += 1
            if not self.stepped:  # bench/startup.py times `python -m trainer` by this line, once per process
                if self.env.device.type == "cuda":
                    torch.cuda.synchronize(self.env.device)
                self.stepped = True
                log.info("first optimizer step done %.2f s after start", time.monotonic() - STARTED)
                hangs.set_timeout(self.env, self.cfg.dist.step_timeout_s)  # start-up is over
        return loss

    def _out_of_memory(self) -> str:
        batch, accum = self.cfg.data.batch_size, self.cfg.train.grad_accum_steps
        return (f"{self.env.device} ran out of memory at data.batch_size={batch} per process; try "
                f"data.batch_size={max(1, batch // 2)} train.grad_accum_steps={accum * 2} "
                "(same global batch), or train.precision=bf16")

    def checkpoint_pieces(self) -> dict[str, RankSums]:
        """The loss sums and skip counts, kept per rank and reported summed over ranks."""
        return {"meter": RankSums(self.env, lambda: self.meter.state().tolist(),
                                  lambda sums: self.meter.load_state(torch.tensor(sums, dtype=torch.float64))),
                "skipped_samples": RankSums(self.env, lambda: [self.skipped_samples],
                                            lambda counts: setattr(self, "skipped_samples", int(counts[0])))}

    def flush_meter(self, epoch: int) -> None:
        """Fold the pending step losses into the epoch's sum; a non-finite one stops the run
        (``train.on_nonfinite_loss=stop``) naming its step."""
        bad_step = self.meter.flush()
        if bad_step is not None and self.cfg.train.on_nonfinite_loss == "stop":
            raise NonFiniteLoss(f"the training loss became NaN/inf at step {bad_step} "
                                f"(epoch {epoch + 1}); lower optim.lr, set train.clip_grad_norm, "
                                "or train.on_nonfinite_loss=skip")
