"""The training loop: one process of the job, orchestrating data, model, task and sinks."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from trainer import STARTED, checkpoint, models
from trainer.config import Config, flatten, profile_range, to_dict, to_yaml
from trainer.data.loaders import Position
from trainer.data.stages import DeviceStages, Normalize
from trainer.errors import EXIT_OK, EXIT_STOPPED, NonFiniteLoss, OutOfMemory
from trainer.models import flops
from trainer.observe.console import ProgressBar, log
from trainer.observe.memory import PeakMemory
from trainer.observe.profiling import StepProfiler
from trainer.observe.sinks import MetricSinks
from trainer.observe.visuals import RunVisuals
from trainer.parallel import distributed, slurm, strategy
from trainer.parallel.distributed import DistEnv, LaggedAgreement
from trainer.parallel.seeding import RankRng, rank_seed, seed_everything
from trainer.parallel.signals import StopRequest
from trainer.tasks.registry import build_task
from trainer.train import optim, precision
from trainer.train.checkpointing import RunCheckpoints, StatePiece
from trainer.train.evaluation import Validation
from trainer.train.inputs import build_inputs
from trainer.train.meter import TrainMeter
from trainer.train.records import RunRecord, epoch_line, epoch_record
from trainer.train.step import TrainStep


class Worker:
    """One process of the job: owns its data shard, the model as the Parallel seam wraps it, the
    task, and the rank-0 sinks."""

    def __init__(self, cfg: Config, env: DistEnv, run_dir: Path, stop: StopRequest) -> None:
        self.cfg, self.env, self.run_dir, self.stop = cfg, env, run_dir, stop
        self.device = env.device
        self.precision = precision.resolve(cfg.train.precision, self.device)
        if self.device.type == "cuda":
            precision.configure_cuda_math(cfg.train.cudnn_benchmark, cfg.train.tf32, cfg.train.deterministic)
        seed_everything(cfg.train.seed)
        self.task = build_task(cfg)
        self.inputs = build_inputs(cfg, env, self.task)
        self.classes = self.inputs.classes
        self.net = models.build_for_training(cfg, len(self.classes))
        memory_format = models.memory_format(cfg.model.channels_last)
        self.net.to(self.device, memory_format=memory_format)
        self.eval_net = torch.compile(self.net) if cfg.model.compile else self.net
        self.parallel = strategy.build(env, cfg.model.compile, cfg.dist.find_unused_parameters)
        head = models.head_parameter_names(self.net) if cfg.optim.head_lr_mult != 1 or cfg.model.freeze != "none" \
            else set()
        self.optimizer = optim.build_optimizer(self.net, cfg.optim, self.device, head)
        frozen_epochs = cfg.train.freeze_epochs if cfg.model.freeze == "backbone" else 0
        self.schedule = optim.Schedule(self.optimizer, cfg.sched, cfg.train.epochs, frozen_epochs)
        self.normalize = Normalize(cfg.data.mean, cfg.data.std, self.device)
        self.stages = DeviceStages(self.normalize, self.device, cfg.train.seed, memory_format)
        self.step = TrainStep(self.net, self.parallel.wrap(self.net), self.optimizer, self.parallel, self.task,
                              self.precision, self.device, cfg.train)
        seed_everything(rank_seed(cfg.train.seed, env.rank))  # DDP has broadcast the weights: now masks differ
        self.position, self.record, self.stepped = Position(), RunRecord(cfg.ckpt.metric, cfg.ckpt.mode), False
        self.meter = TrainMeter(cfg.log.every_steps)
        self.peak_memory = PeakMemory(self.device)
        self.agreement = LaggedAgreement(env)
        self.skipped_samples, self.last_save, self.requeue = 0, time.monotonic(), False
        self.validation = Validation(self.inputs.val_loader, self.task, len(self.classes), self.stages,
                                     self.precision, self.parallel, env.control, lambda: self.stop.requested)
        self.checkpoints = RunCheckpoints(cfg, env, run_dir, self.classes)
        self.sinks = MetricSinks(env, run_dir, cfg.log)
        self.visuals = RunVisuals(cfg, env, run_dir, self.classes, self.normalize, self.task)
        self.profiler = StepProfiler(profile_range(cfg.log.profile_steps), env.rank, self.device, run_dir,
                                     quiesce=self.agreement.quiesce)
        self.flops_per_image: float | None = None

    def fit(self) -> int:
        """Train until ``train.epochs`` or a stop signal; return the process exit code."""
        cfg, config_yaml = self.cfg, to_yaml(self.cfg)
        self._announce(config_yaml)
        # One history: what the checkpoint holds, nothing a killed run logged after it.
        jsonl = self.sinks.jsonl_path
        if self.env.is_main and jsonl is not None and (self.record.history or jsonl.exists()):
            checkpoint.rewrite_lines(jsonl, [json.dumps(record) for record in self.record.history])
        try:
            self.sinks.start(flatten(to_dict(cfg)), config_yaml, self.record.global_step)
            self.visuals.at_start(self.sinks, self.net, self.inputs.train_set, self.inputs.sampler, self.device,
                                  self.record.global_step)
            if self.position.epoch >= cfg.train.epochs:
                log.info("nothing to do: the run in %s already finished %d epochs (train.epochs=%d); "
                         "raise train.epochs to continue it, or choose another log.name",
                         self.run_dir, self.position.epoch, cfg.train.epochs)
                return EXIT_OK
            while self.position.epoch < cfg.train.epochs:
                if (reason := self._early_stop()) is not None:
                    log.info("early stop after epoch %d: %s; best checkpoint: %s", self.position.epoch, reason,
                             self.checkpoints.folder / "best.pt")
                    break
                train_stats = self.train_epoch()
                if train_stats is None:
                    return self._stop()
                log.debug("epoch %d: validating %d samples", self.position.epoch + 1,
                          len(self.inputs.val_loader.dataset))
                evidence = self.visuals.evidence()
                val = self.evaluate(self.eval_net, evidence)
                val_ema = self.evaluate(self.step.ema.module) if self.step.ema else None
                if distributed.any_rank(self.env, [self.stop.requested])[0]:  # a stop during validation
                    return self._stop()
                self._end_epoch(train_stats, val, val_ema)
                self.visuals.at_epoch_end(self.sinks, evidence, self.net, self.position.epoch, self.record.global_step)
            self._finish()
            return EXIT_OK
        finally:
            self.profiler.close()
            self.sinks.close()

    def train_epoch(self) -> dict[str, float] | None:
        """The rest of the epoch's global order, from ``position`` on; None if a stop was requested.

        Accumulation windows count from the first micro-batch trained here; the epoch's last
        window may be shorter, and its loss is divided by its real number of micro-batches. Ranks
        agree on stopping (and on timed saves) at every optimizer step, one step late (see
        :class:`LaggedAgreement`), and once more after the last batch.
        """
        cfg, accum, position, sampler = self.cfg, self.cfg.train.grad_accum_steps, self.position, self.inputs.sampler
        self.net.train()
        sampler.set_position(position)
        global_batches = sampler.global_batches()
        if position.consumed == 0:
            self.meter = TrainMeter(cfg.log.every_steps)
        self.peak_memory.reset()
        bar = ProgressBar(self.env, cfg.log.progress_bar, len(global_batches), f"epoch {position.epoch + 1}")
        started, waited, consumed_before = time.perf_counter(), 0.0, position.consumed
        window_start = position.consumed  # where the current accumulation window began
        batches = iter(self.inputs.train_loader)
        for index, global_size in enumerate(global_batches):
            self.profiler.update(self.record.global_step)
            wait_start = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - wait_start
            self.skipped_samples += batch.skipped
            if index % accum == 0:
                window_start = position.consumed
            window = min(accum, len(global_batches) - (index - index % accum))
            boundary = (index + 1) % accum == 0 or index + 1 == len(global_batches)
            batch, stand_in = self.inputs.stand_in.swap(batch)
            images, targets = self.stages(batch, position.epoch, position.consumed, self.env.rank)
            position.consumed += global_size
            if boundary:
                self.schedule.set_window(position.epoch + window_start / sampler.size, position.epochs_done(sampler.size))
            loss = self._train_step(images, targets, window, boundary, stand_in)
            if not stand_in:
                self.meter.update(loss, targets.shape[0], self.record.global_step)
            bar.update()
            if boundary and self.record.global_step % cfg.log.every_steps == 0:
                self._flush_meter()
                running = self.meter.mean_loss()
                bar.set_postfix(loss=f"{running:.4f}")
                self.sinks.scalars({"train/loss_running": running, "train/lr": self.schedule.lr()}, self.record.global_step)
            if boundary and index + 1 < len(global_batches):
                stop, save = self._poll()
                if stop:
                    bar.close()
                    return None
                if save:
                    self.save_checkpoint()
        bar.close()
        self.agreement.settle(2)
        if distributed.any_rank(self.env, [self.stop.requested])[0]:
            return None
        self._flush_meter()
        elapsed = time.perf_counter() - started
        stats = self.meter.reduce(self.env.control)
        stats.update(images_per_s=(position.consumed - consumed_before) / elapsed, data_wait=waited / elapsed,
                     time_s=elapsed)
        return stats

    def _train_step(self, images: torch.Tensor, targets: torch.Tensor, window: int, last: bool,
                    stand_in: bool = False) -> torch.Tensor:
        """:meth:`TrainStep.micro_batch`, with a running out of memory turned into the one-line hint."""
        try:
            loss = self.step.micro_batch(images, targets, window, last, stand_in)
        except torch.OutOfMemoryError:
            batch, accum = self.cfg.data.batch_size, self.cfg.train.grad_accum_steps
            raise OutOfMemory(f"{self.device} ran out of memory at data.batch_size={batch} per process; try "
                              f"data.batch_size={max(1, batch // 2)} train.grad_accum_steps={accum * 2} "
                              "(same global batch), or train.precision=bf16") from None
        if last:
            self.record.global_step += 1
            if not self.stepped:
                self._first_step_done()
        return loss

    def _first_step_done(self) -> None:
        """Log once per process how long start-up took, up to the end of the first optimizer step
        (``bench/startup.py`` times ``python -m trainer`` by this line)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stepped = True
        log.info("first optimizer step done %.2f s after start", time.monotonic() - STARTED)

    def _flush_meter(self) -> None:
        bad_step = self.meter.flush()
        if bad_step is not None and self.cfg.train.on_nonfinite_loss == "stop":
            raise NonFiniteLoss(f"the training loss became NaN/inf at step {bad_step} "
                                f"(epoch {self.position.epoch + 1}); lower optim.lr, set train.clip_grad_norm, "
                                "or train.on_nonfinite_loss=skip")

    def _poll(self) -> tuple[bool, bool]:
        """At an optimizer-step boundary: should all ranks stop, or save a mid-epoch checkpoint?"""
        ckpt = self.cfg.ckpt
        due = ckpt.every_steps > 0 and self.record.global_step % ckpt.every_steps == 0
        timed = ckpt.every_minutes > 0 and time.monotonic() - self.last_save >= ckpt.every_minutes * 60
        stop, timed = self.agreement.poll([self.stop.requested, timed])
        return stop, due or timed

    def _stop(self) -> int:
        """Save where the loop stopped; on the warning signal, ask for a SLURM requeue after teardown."""
        ckpt = self.cfg.ckpt
        self.agreement.settle(2)
        self.save_checkpoint()
        log.warning("stopped by %s at epoch %d, %d of %d samples; checkpoint saved, exit code %d",
                    self.stop.signal_name or "a signal on another rank", self.position.epoch + 1,
                    self.position.consumed, self.inputs.sampler.size, EXIT_STOPPED)
        # Any rank's warning counts: the stop is agreed, so rank 0 may stop before its own copy arrives.
        warned = distributed.any_rank(self.env, [ckpt.warning_signal in self.stop.received])[0]
        self.requeue = self.env.is_main and ckpt.requeue and warned and slurm.may_requeue(ckpt.max_requeues)
        return EXIT_STOPPED

    def evaluate(self, model: torch.nn.Module, observer: Any = None) -> dict[str, float]:
        """Metrics of ``model`` over the whole validation set (see :class:`Validation`)."""
        metrics, skipped = self.validation(model, observer)
        self.skipped_samples += skipped
        return metrics

    def _end_epoch(self, train: dict[str, float], val: dict[str, float], val_ema: dict[str, float] | None) -> None:
        cfg, env, epoch = self.cfg, self.env, self.position.epoch + 1
        record = epoch_record(epoch, self.record.global_step, train, val, val_ema, lr=self.schedule.lr(),
                              skipped_steps=self.step.skipped(),
                              global_batch=cfg.data.batch_size * env.world_size * cfg.train.grad_accum_steps,
                              **self.peak_memory.read())
        peak = flops.peak_tflops(self.device, self.precision.name, cfg.train.tf32, cfg.log.peak_tflops)
        record.update(flops.throughput(self.flops_per_image, train["images_per_s"], peak, env.world_size))
        if skipped := sum(distributed.all_gather_objects(env, self.skipped_samples)):
            record["data/skipped_samples"] = skipped
            log.warning("epoch %d: skipped %d unreadable samples so far (data.on_bad_sample=skip)", epoch, skipped)
        improved = self.record.add(record)
        self.position = Position(epoch, 0)
        log.info(epoch_line(record, cfg.train.epochs, self.task.summary(val)))
        self.sinks.epoch(record, self.record.global_step)
        self.save_checkpoint(best=improved)

    def _early_stop(self) -> str | None:
        """Why to stop before the next epoch (``train.early_stop_patience``), as rank 0 decides."""
        train = self.cfg.train
        if train.early_stop_patience <= 0:
            return None
        return distributed.broadcast_object(self.env, self.record.early_stop(train.early_stop_patience,
                                                                             train.early_stop_min_delta))

    def _announce(self, config_yaml: str) -> None:
        cfg, env = self.cfg, self.env
        log.info("resolved config:\n%s", config_yaml.rstrip())
        if env.is_main:
            self.flops_per_image = flops.training_flops_per_image(self.net, cfg.data.image_size)
        log.info("run %s | %d process(es) on %s (%s) | model %s, %s parameters, %s training FLOPs per image | "
                 "precision %s | task %s, %d classes, %d train / %d val samples | batch %d per process, %d global",
                 self.run_dir, env.world_size, self.device, env.backend or "no process group",
                 models.resolve_name(cfg.model.name), f"{models.count_parameters(self.net):,}",
                 flops.short(self.flops_per_image), self.precision.name, self.task.name, len(self.classes),
                 self.inputs.sampler.size, len(self.inputs.val_loader.dataset), cfg.data.batch_size,
                 cfg.data.batch_size * env.world_size * cfg.train.grad_accum_steps)

    def _finish(self) -> None:
        metric, history = self.cfg.ckpt.metric, self.record.history
        self.sinks.finish(flatten(to_dict(self.cfg)),
                          {k: v for k, v in history[-1].items() if k.startswith("val/") and k != "val/samples"})
        log.info("done: %s %.4f (best %s %.4f)", metric, history[-1][metric], metric, self.record.best)
        log.info("logs: %s%s", self.run_dir / "logs", self.sinks.where())
        log.info("checkpoints: %s, %s", self.checkpoints.folder / "last.pt", self.checkpoints.folder / "best.pt")

    # ----------------------------------------------------------------------------- checkpoints
    def checkpoint_pieces(self) -> dict[str, checkpoint.Stateful]:
        """The stateful pieces a checkpoint holds, in restore order (the Worker's own counters
        first: the RNG piece reads the step). Saving some of them is a collective."""
        env, parallel, net, optimizer = self.env, self.parallel, self.net, self.optimizer
        return {
            "worker": self.record,
            "model": StatePiece(lambda: parallel.model_state(net), lambda s: parallel.load_model_state(net, s)),
            "optimizer": StatePiece(lambda: parallel.optimizer_state(net, optimizer),
                                    lambda s: parallel.load_optimizer_state(net, optimizer, s)),
            "schedule": self.schedule, "step": self.step, "position": self.position,
            "meter": checkpoint.RankSums(env, lambda: self.meter.state().tolist(),
                                         lambda sums: self.meter.load_state(torch.tensor(sums, dtype=torch.float64))),
            "skipped_samples": checkpoint.RankSums(env, lambda: [self.skipped_samples],
                                                   lambda counts: setattr(self, "skipped_samples", int(counts[0]))),
            "rng": RankRng(env, self.cfg.train.seed, lambda: self.record.global_step),
            "trackers": self.sinks,
        }

    def save_checkpoint(self, best: bool = False) -> None:
        """Every rank: the pieces' state; rank 0 writes it (see :class:`RunCheckpoints`)."""
        self._flush_meter()
        meta = {"epoch": self.position.epoch, "global_step": self.record.global_step, "best": self.record.best,
                "history": self.record.history}
        self.checkpoints.save(self.checkpoint_pieces(), meta, self.record.global_step, best)
        self.last_save = time.monotonic()

    def resume(self, path: Path, fall_back: bool = False) -> None:
        """Continue from a checkpoint written by :meth:`save_checkpoint` (see :meth:`RunCheckpoints.resume`)."""
        path = self.checkpoints.resume(path, fall_back, self.checkpoint_pieces(), self.net)
        log.info("resumed from %s: epoch %d, %d of %d samples done, step %d", path, self.position.epoch + 1,
                 self.position.consumed, self.inputs.sampler.size, self.record.global_step)
