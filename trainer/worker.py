"""The training loop: build data, model and optimizer, then fit -> train_epoch / evaluate."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer import checkpoint, data, distributed, flops, models, optim, precision, slurm
from trainer.config import Config, flatten, profile_range, to_dict, to_yaml
from trainer.distributed import DistEnv, LaggedAgreement
from trainer.early_stop import early_stop_reason
from trainer.errors import EXIT_OK, EXIT_STOPPED, DataError, NonFiniteLoss, OutOfMemory
from trainer.logs import MetricSinks, ProgressBar, log
from trainer.metrics import EvalObserver, TrainMeter, evaluate_model
from trainer.profiling import StepProfiler
from trainer.resources import PeakMemory
from trainer.seeding import capture_rng, restore_rng, seed_everything
from trainer.signals import StopRequest
from trainer.step import TrainStep
from trainer.visuals import RunVisuals


class Worker:
    """One process of the job: owns its data shard, the (DDP-wrapped) model and the rank-0 sinks."""

    def __init__(self, cfg: Config, env: DistEnv, run_dir: Path, stop: StopRequest) -> None:
        self.cfg, self.env, self.run_dir, self.stop = cfg, env, run_dir, stop
        self.device = env.device
        self.precision = precision.resolve(cfg.train.precision, self.device)
        if self.device.type == "cuda":
            precision.configure_cuda_math(cfg.train.cudnn_benchmark, cfg.train.tf32, cfg.train.deterministic)
        seed_everything(cfg.train.seed)
        self._build_data()
        self.net = models.build_model(cfg.model.name, len(self.classes), cfg.data.image_size, cfg.model.init)
        self.memory_format = models.memory_format(cfg.model.channels_last)
        self.net.to(self.device, memory_format=self.memory_format)
        self.eval_net: nn.Module = torch.compile(self.net) if cfg.model.compile else self.net
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.train.grad_accum_steps)
        self.optimizer = optim.build_optimizer(self.net, cfg.optim, self.device)
        self.scheduler = optim.build_scheduler(self.optimizer, cfg.sched, self.steps_per_epoch, cfg.train.epochs)
        self.step = TrainStep(self.net, self._training_model(), self.optimizer, self.scheduler, self.precision,
                              self.device, cfg.train, self.memory_format)
        self.epoch, self.batches_done, self.global_step = 0, 0, 0
        self.best: float | None = None
        self.history: list[dict[str, Any]] = []
        self.meter = TrainMeter(self.device, cfg.log.every_steps)
        self.peak_memory = PeakMemory(self.device)
        self.agreement = LaggedAgreement(env)
        self.skipped_samples = 0
        self.last_save = time.monotonic()
        self.requeue = False
        self.sinks = MetricSinks(env, run_dir, cfg.log)
        self.visuals = RunVisuals(cfg, env, run_dir, self.classes)
        self.profiler = StepProfiler(profile_range(cfg.log.profile_steps), env.rank, self.device, run_dir)
        self.flops_per_image: float | None = None

    # ----------------------------------------------------------------------------- building
    def _build_data(self) -> None:
        cfg, env = self.cfg, self.env
        splits = data.prepared_splits(cfg.data, env)
        self.classes = splits.classes
        train_set = data.SeededTransformDataset(splits.train, data.build_transform(cfg.data, True),
                                                cfg.train.seed, cfg.data.on_bad_sample == "skip")
        self.train_sampler = data.TrainSampler(train_set, env.world_size, env.rank, cfg.train.seed)
        batch = cfg.data.batch_size
        if self.train_sampler.num_samples < batch:
            raise DataError(f"each of the {env.world_size} processes gets {self.train_sampler.num_samples} "
                            f"training samples, fewer than data.batch_size={batch}; lower the batch size")
        self.batches_per_epoch = self.train_sampler.num_samples // batch
        batch_bytes = batch * 3 * cfg.data.image_size ** 2 * 4
        if (shm := data.shared_memory_warning(cfg.data.num_workers * env.topology.local_world_size, batch_bytes)):
            log.warning(shm)
        self.train_loader = data.build_loader(train_set, self.train_sampler, batch, cfg.data, self.device,
                                              cfg.train.seed + env.rank, drop_last=True)
        self.val_loader = data.build_val_loader(splits.val, cfg.data, env.world_size, env.rank, self.device,
                                                cfg.train.seed)

    def _training_model(self) -> nn.Module:
        """``net`` as the training step runs it: DDP first, then torch.compile, so that Dynamo sees
        DDP and splits the graph at its gradient buckets (all-reduce overlaps the backward)."""
        model: nn.Module = self.net
        if self.env.is_distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids,
                                            find_unused_parameters=self.cfg.dist.find_unused_parameters)
        return torch.compile(model) if self.cfg.model.compile else model

    # ----------------------------------------------------------------------------- running
    def fit(self) -> int:
        """Train until ``train.epochs`` or a stop signal; return the process exit code."""
        cfg, config_yaml = self.cfg, to_yaml(self.cfg)
        self._announce(config_yaml)
        try:
            self.sinks.start(flatten(to_dict(cfg)), config_yaml)
            self.visuals.at_start(self.sinks, self.net, self.train_sampler.dataset, self.train_sampler,
                                  self.device, self.global_step)
            if self.epoch >= cfg.train.epochs:
                log.info("nothing to do: the run in %s already finished %d epochs (train.epochs=%d); "
                         "raise train.epochs to continue it, or choose another log.name",
                         self.run_dir, self.epoch, cfg.train.epochs)
                return EXIT_OK
            while self.epoch < cfg.train.epochs:
                if (reason := self._early_stop()) is not None:
                    log.info("early stop after epoch %d: %s; best checkpoint: %s", self.epoch, reason,
                             checkpoint.checkpoint_dir(self.run_dir) / "best.pt")
                    break
                train_stats = self.train_epoch()
                if train_stats is None:
                    return self._stop()
                log.debug("epoch %d: validating %d samples", self.epoch + 1, len(self.val_loader.dataset))
                evidence = self.visuals.evidence()
                val = self.evaluate(self.eval_net, evidence)
                val_ema = self.evaluate(self.step.ema.module) if self.step.ema else None
                if distributed.any_rank(self.env, [self.stop.requested])[0]:  # a stop during validation
                    return self._stop()
                self._end_epoch(train_stats, val, val_ema)
                self.visuals.at_epoch_end(self.sinks, evidence, self.net, self.epoch, self.global_step)
            self._finish()
            return EXIT_OK
        finally:
            self.profiler.close()
            self.sinks.close()

    def train_epoch(self) -> dict[str, float] | None:
        """One pass over this rank's shard (from ``batches_done`` on); None if a stop was requested.

        Ranks agree on stopping (and on timed saves) at every optimizer step, one step late (see
        :class:`LaggedAgreement`), and once more after the last batch.
        """
        cfg, accum = self.cfg, self.cfg.train.grad_accum_steps
        self.net.train()
        self.train_sampler.set_epoch(self.epoch)
        self.train_sampler.set_start(self.batches_done * cfg.data.batch_size)
        if self.batches_done == 0:
            self.meter = TrainMeter(self.device, cfg.log.every_steps)
        self.peak_memory.reset()
        bar = ProgressBar(self.env, cfg.log.progress_bar, self.batches_per_epoch, f"epoch {self.epoch + 1}")
        bar.update(self.batches_done)
        started, waited, counted_before = time.perf_counter(), 0.0, self.meter.count
        batches = iter(self.train_loader)
        while True:
            self.profiler.update(self.global_step)
            wait_start = time.perf_counter()
            batch = next(batches, None)
            waited += time.perf_counter() - wait_start
            if batch is None:
                break
            images, targets, skipped = batch
            self.skipped_samples += skipped
            window_start = self.batches_done - self.batches_done % accum
            window = min(accum, self.batches_per_epoch - window_start)  # the epoch's last window may be shorter
            self.batches_done += 1
            last = self.batches_done - window_start == window
            loss = self._train_step(images, targets, window, last)
            self.meter.update(loss, targets.shape[0], self.global_step)
            bar.update()
            if self.batches_done % cfg.log.every_steps == 0:
                self._flush_meter()
                running = self.meter.mean_loss()
                bar.set_postfix(loss=f"{running:.4f}")
                self.sinks.scalars({"train/loss_running": running, "train/lr": self.step.lr()}, self.global_step)
            if last and self.batches_done < self.batches_per_epoch:
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
        trained_now = (self.meter.count - counted_before) * self.env.world_size  # not what a resume restored
        stats.update(images_per_s=trained_now / elapsed, data_wait=waited / elapsed, time_s=elapsed)
        return stats

    def _train_step(self, images: torch.Tensor, targets: torch.Tensor, window: int, last: bool) -> torch.Tensor:
        """:meth:`TrainStep.micro_batch`, with a running out of memory turned into the one-line hint."""
        try:
            loss = self.step.micro_batch(images, targets, window, last)
        except torch.OutOfMemoryError:
            batch, accum = self.cfg.data.batch_size, self.cfg.train.grad_accum_steps
            raise OutOfMemory(f"{self.device} ran out of memory at data.batch_size={batch} per process; try "
                              f"data.batch_size={max(1, batch // 2)} train.grad_accum_steps={accum * 2} "
                              "(same global batch), or train.precision=bf16") from None
        if last:
            self.global_step += 1
        return loss

    def _flush_meter(self) -> None:
        bad_step = self.meter.flush()
        if bad_step is not None and self.cfg.train.on_nonfinite_loss == "stop":
            raise NonFiniteLoss(f"the training loss became NaN/inf at step {bad_step} (epoch {self.epoch + 1}); "
                                "lower optim.lr, set train.clip_grad_norm, or train.on_nonfinite_loss=skip")

    def _poll(self) -> tuple[bool, bool]:
        """At an optimizer-step boundary: should all ranks stop, or save a mid-epoch checkpoint?"""
        ckpt = self.cfg.ckpt
        due = ckpt.every_steps > 0 and self.global_step % ckpt.every_steps == 0
        timed = ckpt.every_minutes > 0 and time.monotonic() - self.last_save >= ckpt.every_minutes * 60
        stop, timed = self.agreement.poll([self.stop.requested, timed])
        return stop, due or timed

    def _stop(self) -> int:
        """Save where the loop stopped; on the warning signal, ask for a SLURM requeue after teardown."""
        ckpt = self.cfg.ckpt
        self.agreement.settle(2)
        self.save_checkpoint()
        log.warning("stopped by %s at epoch %d batch %d; checkpoint saved, exit code %d",
                    self.stop.signal_name or "a signal on another rank", self.epoch + 1, self.batches_done,
                    EXIT_STOPPED)
        warned = ckpt.warning_signal in self.stop.received
        self.requeue = self.env.is_main and ckpt.requeue and warned and slurm.may_requeue(ckpt.max_requeues)
        return EXIT_STOPPED

    def evaluate(self, model: nn.Module, observer: EvalObserver | None = None) -> dict[str, float]:
        """Metrics of ``model`` over the whole validation set, every sample counted once across ranks.

        A stop signal cuts it short (the partial metrics are then not logged).
        """
        try:
            metrics, skipped = evaluate_model(model, self.val_loader, len(self.classes), self.device,
                                              self.precision, self.memory_format, self.env.control,
                                              lambda: self.stop.requested, observer)
        except torch.OutOfMemoryError:
            batch = self.val_loader.batch_size
            raise OutOfMemory(f"{self.device} ran out of memory in validation at batch {batch} per process; "
                              f"set data.val_batch_size={max(1, (batch or 2) // 2)}") from None
        self.skipped_samples += skipped
        return metrics

    # ----------------------------------------------------------------------------- bookkeeping
    def _end_epoch(self, train: dict[str, float], val: dict[str, float], val_ema: dict[str, float] | None) -> None:
        cfg = self.cfg
        record: dict[str, Any] = {"epoch": self.epoch + 1, "step": self.global_step}
        record.update({f"train/{k}": v for k, v in train.items()})
        record.update({f"val/{k}": v for k, v in val.items()})
        record.update({f"val_ema/{k}": v for k, v in (val_ema or {}).items()})
        record["train/lr"] = self.step.lr()
        record["train/skipped_steps"] = self.step.skipped()
        record["train/global_batch"] = cfg.data.batch_size * self.env.world_size * cfg.train.grad_accum_steps
        record.update({f"train/{k}": v for k, v in self.peak_memory.read().items()})
        skipped = sum(distributed.all_gather_objects(self.env, self.skipped_samples))
        if skipped:
            record["data/skipped_samples"] = skipped
            log.warning("epoch %d: skipped %d unreadable samples so far (data.on_bad_sample=skip)",
                        self.epoch + 1, skipped)
        value = record[cfg.ckpt.metric]  # config.validate checked that it is logged
        improved = self.best is None or (value > self.best if cfg.ckpt.mode == "max" else value < self.best)
        if improved:
            self.best = value
        self.history.append(record)
        self.epoch, self.batches_done = self.epoch + 1, 0
        log.info("epoch %d/%d  train loss %.4f | val loss %.4f top1 %.4f top5 %.4f f1 %.4f | lr %.3g | "
                 "%.0f img/s | data wait %.0f%% | peak mem %.0f MB", record["epoch"], cfg.train.epochs,
                 train["loss"], val["loss"], val["top1"], val["top5"], val["f1"], record["train/lr"],
                 train["images_per_s"], 100 * train["data_wait"], record["train/peak_mem_mb"])
        peak = flops.peak_tflops(self.device, self.precision.name, cfg.train.tf32, cfg.log.peak_tflops)
        perf = flops.throughput(self.flops_per_image, train["images_per_s"], peak, self.env.world_size)
        self.sinks.epoch({**record, **perf}, self.global_step)
        self.save_checkpoint(best=improved)

    def _early_stop(self) -> str | None:
        """Why to stop before the next epoch (``train.early_stop_patience``), as rank 0 decides."""
        cfg = self.cfg
        if cfg.train.early_stop_patience <= 0:
            return None
        reason = early_stop_reason(self.history, cfg.ckpt.metric, cfg.ckpt.mode, cfg.train.early_stop_patience,
                                   cfg.train.early_stop_min_delta)
        return distributed.broadcast_object(self.env, reason)

    def _announce(self, config_yaml: str) -> None:
        cfg, env = self.cfg, self.env
        log.info("resolved config:\n%s", config_yaml.rstrip())
        if env.is_main:
            self.flops_per_image = flops.training_flops_per_image(self.net, cfg.data.image_size)
        log.info("run %s | %d process(es) on %s (%s) | model %s, %s parameters, %s training FLOPs per image | "
                 "precision %s | %d classes, %d train / %d val samples | batch %d per process, %d global",
                 self.run_dir, env.world_size, self.device, env.backend or "no process group",
                 models.resolve_name(cfg.model.name), f"{models.count_parameters(self.net):,}",
                 flops.short(self.flops_per_image), self.precision.name, len(self.classes),
                 len(self.train_sampler.dataset), len(self.val_loader.dataset), cfg.data.batch_size,
                 cfg.data.batch_size * env.world_size * cfg.train.grad_accum_steps)

    def _finish(self) -> None:
        final = {k: v for k, v in self.history[-1].items() if k.startswith("val/") and k != "val/samples"}
        self.sinks.finish(flatten(to_dict(self.cfg)), final)
        ckpts = checkpoint.checkpoint_dir(self.run_dir)
        log.info("done: val top1 %.4f (best %s %.4f)", final["val/top1"], self.cfg.ckpt.metric, self.best)
        log.info("logs: %s%s", self.run_dir / "logs", self.sinks.where())
        log.info("checkpoints: %s, %s", ckpts / "last.pt", ckpts / "best.pt")

    # ----------------------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        """Everything needed to continue exactly (a collective: gathers every rank's RNG)."""
        mid_epoch = self.batches_done > 0
        if mid_epoch:
            self._flush_meter()
        per_rank = distributed.all_gather_objects(
            self.env, {"rng": capture_rng(), "train_meter": self.meter.state() if mid_epoch else None})
        return {
            "format": 1, "model": models.unwrap(self.net).state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "step": self.step.state_dict(), "epoch": self.epoch, "batches_done": self.batches_done,
            "global_step": self.global_step, "world_size": self.env.world_size, "best": self.best,
            "history": self.history, "per_rank": per_rank, "classes": self.classes,
            "config": to_dict(self.cfg), "versions": _versions(),
            "trackers": self.sinks.state_dict(),
        }

    def save_checkpoint(self, best: bool = False) -> None:
        """Rank 0 writes ``step_<n>.pt`` atomically and points ``last.pt`` (and ``best.pt``) at it."""
        state = self.state()
        if self.env.is_main:
            folder = checkpoint.checkpoint_dir(self.run_dir)
            path = folder / f"step_{self.global_step:09d}.pt"
            checkpoint.save_atomic(state, path)
            checkpoint.link_atomic(path, folder / "last.pt")
            if best:
                checkpoint.link_atomic(path, folder / "best.pt")
            checkpoint.prune(folder, self.cfg.ckpt.keep_last)
        distributed.barrier(self.env)
        self.last_save = time.monotonic()

    def resume(self, path: Path) -> None:
        """Continue from a checkpoint written by :meth:`save_checkpoint`."""
        state = checkpoint.load(path)
        checkpoint.check_classes(state, self.classes, path)
        checkpoint.load_model_weights(models.unwrap(self.net), state["model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step.load_state_dict(state["step"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.best, self.history = state["best"], state["history"]
        self.batches_done = state["batches_done"]
        self.sinks.load_state_dict(state.get("trackers", {}))
        if state["world_size"] == self.env.world_size:
            mine = state["per_rank"][self.env.rank]
            restore_rng(mine["rng"])
            if mine["train_meter"] is not None:
                self.meter.load_state(mine["train_meter"])
        elif self.batches_done:
            log.warning("checkpoint %s was written by %d processes, this run has %d: restarting epoch %d "
                        "from its first batch", path, state["world_size"], self.env.world_size, self.epoch + 1)
            self.batches_done = 0
        log.info("resumed from %s: epoch %d, batch %d, step %d", path, self.epoch + 1, self.batches_done,
                 self.global_step)


def _versions() -> dict[str, str]:
    import platform

    import torchvision

    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__)}
