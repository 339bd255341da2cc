"""The training loop: build data, model and optimizer, then fit -> train_epoch / evaluate."""

from __future__ import annotations

import math
import resource
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from trainer import checkpoint, data, distributed, flops, models, optim, precision
from trainer.config import Config, flatten, profile_range, to_dict, to_yaml
from trainer.distributed import DistEnv
from trainer.errors import EXIT_OK, EXIT_STOPPED, DataError, NonFiniteLoss, OutOfMemory
from trainer.logs import MetricSinks, ProgressBar, log
from trainer.early_stop import early_stop_reason
from trainer.metrics import EvalObserver, TrainMeter, evaluate_model
from trainer.profiling import StepProfiler
from trainer.seeding import capture_rng, restore_rng, seed_everything
from trainer.signals import StopRequest
from trainer.visuals import RunVisuals

STOP_POLL_STEPS = 10
"""How often (in batches) ranks agree on whether a stop signal arrived; a collective, so not every step."""


class Worker:
    """One process of the job: owns its data shard, the (DDP-wrapped) model and the rank-0 sinks."""

    def __init__(self, cfg: Config, env: DistEnv, run_dir: Path, stop: StopRequest) -> None:
        self.cfg, self.env, self.run_dir, self.stop = cfg, env, run_dir, stop
        self.device = env.device
        self.precision = precision.resolve(cfg.train.precision, self.device)
        if self.device.type == "cuda":
            precision.configure_cuda_math(cfg.train.cudnn_benchmark, cfg.train.tf32)
        seed_everything(cfg.train.seed)
        self._build_data()
        self._build_model()
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.train.grad_accum_steps)
        self.optimizer = optim.build_optimizer(self.net, cfg.optim, self.device)
        self.scheduler = optim.build_scheduler(self.optimizer, cfg.sched, self.steps_per_epoch, cfg.train.epochs)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.scaled)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
        self.epoch, self.batches_done, self.global_step = 0, 0, 0
        self.best: float | None = None
        self.history: list[dict[str, Any]] = []
        self.meter = TrainMeter(self.device, cfg.log.every_steps)
        self.ema = (AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)
                    if cfg.train.ema_decay > 0 else None)
        self.skipped_samples, self.skipped_steps = 0, 0
        self.scaler_skips = torch.zeros((), dtype=torch.int32, device=self.device)
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

    def _build_model(self) -> None:
        cfg = self.cfg
        self.net = models.build_model(cfg.model.name, len(self.classes), cfg.data.image_size, cfg.model.init)
        self.memory_format = models.memory_format(cfg.model.channels_last)
        self.net.to(self.device, memory_format=self.memory_format)
        self.eval_model: nn.Module = torch.compile(self.net) if cfg.model.compile else self.net
        self.model: nn.Module = self.eval_model
        if self.env.is_distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.eval_model, device_ids=ids,
                                                 find_unused_parameters=cfg.dist.find_unused_parameters)

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
                evidence = self.visuals.evidence()
                self._end_epoch(train_stats, self.evaluate(self.eval_model, evidence),
                                self.evaluate(self.ema.module) if self.ema else None)
                self.visuals.at_epoch_end(self.sinks, evidence, self.net, self.epoch, self.global_step)
            self._finish()
            return EXIT_OK
        finally:
            self.profiler.close()
            self.sinks.close()

    def train_epoch(self) -> dict[str, float] | None:
        """One pass over this rank's shard (from ``batches_done`` on); None if a stop was requested."""
        cfg, accum = self.cfg, self.cfg.train.grad_accum_steps
        self.net.train()
        self.train_sampler.set_epoch(self.epoch)
        self.train_sampler.set_start(self.batches_done * cfg.data.batch_size)
        if self.batches_done == 0:
            self.meter = TrainMeter(self.device, cfg.log.every_steps)
        bar = ProgressBar(self.env, cfg.log.progress_bar, self.batches_per_epoch, f"epoch {self.epoch + 1}")
        bar.update(self.batches_done)
        started, waited = time.perf_counter(), 0.0
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
            self.batches_done += 1
            boundary = self.batches_done % accum == 0 or self.batches_done == self.batches_per_epoch
            loss = self._train_step(images, targets, boundary)
            self.meter.update(loss, targets.shape[0], self.global_step)
            bar.update()
            if self.batches_done % cfg.log.every_steps == 0:
                self._flush_meter()
                running = self.meter.mean_loss()
                bar.set_postfix(loss=f"{running:.4f}")
                self.sinks.scalars({"train/loss_running": running,
                                    "train/lr": self.scheduler.get_last_lr()[0]}, self.global_step)
            if boundary and self.batches_done < self.batches_per_epoch:
                stop, save = self._poll()
                if stop:
                    bar.close()
                    return None
                if save:
                    self.save_checkpoint()
        bar.close()
        self._flush_meter()
        elapsed = time.perf_counter() - started
        stats = self.meter.reduce()
        stats.update(images_per_s=stats["samples"] / elapsed, data_wait=waited / elapsed, time_s=elapsed)
        return stats

    def _train_step(self, images: torch.Tensor, targets: torch.Tensor, boundary: bool) -> torch.Tensor:
        """Forward and backward one micro-batch; at an accumulation boundary, step the optimizer."""
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        targets = targets.to(self.device, non_blocking=True)
        syncing = boundary or not isinstance(self.model, DistributedDataParallel)
        try:
            with nullcontext() if syncing else self.model.no_sync():
                with self.precision.autocast(self.device):
                    logits = self.model(images)
                loss = self.criterion(logits.float(), targets)
                accum = self.cfg.train.grad_accum_steps
                self.scaler.scale(loss / accum if accum > 1 else loss).backward()
        except torch.OutOfMemoryError:
            batch, accum = self.cfg.data.batch_size, self.cfg.train.grad_accum_steps
            raise OutOfMemory(f"{self.device} ran out of memory at data.batch_size={batch} per process; try "
                              f"data.batch_size={max(1, batch // 2)} train.grad_accum_steps={accum * 2} "
                              "(same global batch), or train.precision=bf16") from None
        if boundary:
            self._optimizer_step()
        return loss.detach()

    def _optimizer_step(self) -> None:
        """Unscale, clip, step (or skip non-finite gradients), update the scaler, EMA and schedule."""
        train = self.cfg.train
        skip_nonfinite = train.on_nonfinite_loss == "skip" and not self.scaler.is_enabled()
        if train.clip_grad_norm > 0 or skip_nonfinite:
            self.scaler.unscale_(self.optimizer)
            norm = nn.utils.clip_grad_norm_(self.net.parameters(), train.clip_grad_norm or float("inf"))
            if skip_nonfinite and not torch.isfinite(norm):  # the one per-step sync, opt-in
                self.skipped_steps += 1
                self.optimizer.zero_grad(set_to_none=True)
                return
        scale_before = self.scaler._scale.clone() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if scale_before is not None:  # the scaler lowers its scale exactly when it skipped the step
            self.scaler_skips += (self.scaler._scale < scale_before).int()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(self.net)
        self.scheduler.step()
        self.global_step += 1

    def _flush_meter(self) -> None:
        bad_step = self.meter.flush()
        if bad_step is not None and self.cfg.train.on_nonfinite_loss == "stop":
            raise NonFiniteLoss(f"the training loss became NaN/inf at step {bad_step} (epoch {self.epoch + 1}); "
                                "lower optim.lr, set train.clip_grad_norm, or train.on_nonfinite_loss=skip")

    def _poll(self) -> tuple[bool, bool]:
        """At an optimizer-step boundary: should all ranks stop, or save a mid-epoch checkpoint?

        Ranks agree through one small all-reduce, so it runs every step only in a single process.
        """
        ckpt = self.cfg.ckpt
        due = ckpt.every_steps > 0 and self.global_step % ckpt.every_steps == 0
        if self.env.is_distributed and self.global_step % STOP_POLL_STEPS and not due:
            return False, False
        timed = ckpt.every_minutes > 0 and time.monotonic() - self.last_save >= ckpt.every_minutes * 60
        stop, timed = distributed.any_rank(self.env, [self.stop.requested, timed])
        return stop, due or timed

    def _stop(self) -> int:
        """Save where the loop stopped; on the warning signal, ask for a SLURM requeue after teardown."""
        cfg = self.cfg
        self.save_checkpoint()
        log.warning("stopped by %s at epoch %d batch %d; checkpoint saved, exit code %d",
                    self.stop.signal_name or "a signal on another rank", self.epoch + 1, self.batches_done,
                    EXIT_STOPPED)
        self.requeue = self.env.is_main and cfg.ckpt.requeue and self.stop.signal_name == cfg.ckpt.warning_signal
        return EXIT_STOPPED

    def evaluate(self, model: nn.Module, observer: EvalObserver | None = None) -> dict[str, float]:
        """Metrics of ``model`` over the whole validation set, every sample counted once across ranks."""
        metrics, skipped = evaluate_model(model, self.val_loader, len(self.classes), self.device, self.precision,
                                          self.memory_format, observer)
        self.skipped_samples += skipped
        return metrics

    # ----------------------------------------------------------------------------- bookkeeping
    def _end_epoch(self, train: dict[str, float], val: dict[str, float], val_ema: dict[str, float] | None) -> None:
        cfg = self.cfg
        record: dict[str, Any] = {"epoch": self.epoch + 1, "step": self.global_step}
        record.update({f"train/{k}": v for k, v in train.items()})
        record.update({f"val/{k}": v for k, v in val.items()})
        record.update({f"val_ema/{k}": v for k, v in (val_ema or {}).items()})
        record["train/lr"] = self.scheduler.get_last_lr()[0]
        record["train/skipped_steps"] = self.skipped_steps + int(self.scaler_skips)
        record["train/global_batch"] = cfg.data.batch_size * self.env.world_size * cfg.train.grad_accum_steps
        record["train/peak_mem_mb"] = _peak_memory_mb(self.device)
        skipped = sum(distributed.all_gather_objects(self.env, self.skipped_samples))
        if skipped:
            record["data/skipped_samples"] = skipped
            log.warning("epoch %d: skipped %d unreadable samples so far (data.on_bad_sample=skip)",
                        self.epoch + 1, skipped)
        value = record.get(cfg.ckpt.metric)
        if value is None:
            raise DataError(f"ckpt.metric '{cfg.ckpt.metric}' is not a logged metric; "
                            f"choose one of {', '.join(k for k in record if k.startswith('val/'))}")
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
            "scaler": self.scaler.state_dict(), "epoch": self.epoch, "batches_done": self.batches_done,
            "global_step": self.global_step, "world_size": self.env.world_size, "best": self.best,
            "history": self.history, "per_rank": per_rank, "classes": self.classes,
            "config": to_dict(self.cfg), "versions": _versions(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
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
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.best, self.history = state["best"], state["history"]
        self.batches_done = state["batches_done"]
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
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


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
