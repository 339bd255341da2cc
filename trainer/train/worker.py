"""The training loop: build data, model and optimizer, then fit -> train_epoch / evaluate."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer import STARTED, checkpoint, models
from trainer.config import Config, flatten, profile_range, to_dict, to_yaml
from trainer.data import loaders, sources
from trainer.data.stages import Normalize
from trainer.errors import EXIT_OK, EXIT_STOPPED, CheckpointError, DataError, NonFiniteLoss, OutOfMemory
from trainer.models import flops
from trainer.observe.logs import MetricSinks, ProgressBar, log
from trainer.observe.memory import PeakMemory
from trainer.observe.profiling import StepProfiler
from trainer.observe.visuals import RunVisuals
from trainer.parallel import distributed, slurm
from trainer.parallel.distributed import DistEnv, LaggedAgreement
from trainer.parallel.seeding import RankRng, rank_seed, seed_everything
from trainer.parallel.signals import StopRequest
from trainer.train import optim, precision
from trainer.train.bad_batches import StandIn
from trainer.train.early_stop import early_stop_reason
from trainer.train.metrics import EvalObserver, TrainMeter, evaluate_model
from trainer.train.step import TrainStep


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
        self.net = models.build_for_training(cfg, len(self.classes))
        self.memory_format = models.memory_format(cfg.model.channels_last)
        self.net.to(self.device, memory_format=self.memory_format)
        self.eval_net: nn.Module = torch.compile(self.net) if cfg.model.compile else self.net
        fine_tuning = cfg.optim.head_lr_mult != 1 or cfg.model.freeze != "none"
        head = models.head_parameter_names(self.net) if fine_tuning else set()
        self.optimizer = optim.build_optimizer(self.net, cfg.optim, self.device, head)
        frozen_epochs = cfg.train.freeze_epochs if cfg.model.freeze == "backbone" else 0
        self.schedule = optim.Schedule(self.optimizer, cfg.sched, cfg.train.epochs, frozen_epochs)
        self.normalize = Normalize(cfg.data.mean, cfg.data.std, self.device)
        self.step = TrainStep(self.net, self._training_model(), self.optimizer, self.precision, self.device,
                              cfg.train, self.normalize, self.memory_format)
        seed_everything(rank_seed(cfg.train.seed, env.rank))  # DDP has broadcast the weights: now masks differ
        self.position = loaders.Position()
        self.global_step = 0
        self.stepped = False  # an optimizer step has finished in this process
        self.best: float | None = None
        self.history: list[dict[str, Any]] = []
        self.meter = TrainMeter(cfg.log.every_steps)
        self.peak_memory = PeakMemory(self.device)
        self.agreement = LaggedAgreement(env)
        self.skipped_samples = 0
        self.last_save = time.monotonic()
        self.requeue = False
        self.sinks = MetricSinks(env, run_dir, cfg.log)
        self.visuals = RunVisuals(cfg, env, run_dir, self.classes, self.normalize)
        self.profiler = StepProfiler(profile_range(cfg.log.profile_steps), env.rank, self.device, run_dir,
                                     quiesce=self.agreement.quiesce)
        self.flops_per_image: float | None = None

    # ----------------------------------------------------------------------------- building
    def _build_data(self) -> None:
        cfg, env = self.cfg, self.env
        splits = sources.prepared_splits(cfg.data, env)
        self.classes = splits.classes
        train_set = loaders.SeededTransformDataset(splits.train, loaders.build_transform(cfg.data, True),
                                                cfg.train.seed, cfg.data.on_bad_sample == "skip")
        if len(train_set) < env.world_size:
            raise DataError(f"{len(train_set)} training samples for {env.world_size} processes: each process "
                            "needs at least one; use fewer processes or more data")
        batch = cfg.data.batch_size
        self.train_sampler = loaders.TrainBatchSampler(len(train_set), env.world_size, env.rank, batch, cfg.train.seed)
        batch_bytes = batch * 3 * cfg.data.image_size ** 2  # uint8 pixels
        if (shm := loaders.shared_memory_warning(cfg.data.num_workers * env.topology.local_world_size, batch_bytes)):
            log.warning(shm)
        self.stand_in = StandIn(train_set.transform, cfg.data.image_size)
        self.train_loader = loaders.build_train_loader(train_set, self.train_sampler, cfg.data, self.device,
                                                    cfg.train.seed + env.rank)
        self.val_loader = loaders.build_val_loader(splits.val, cfg.data, env.world_size, env.rank, self.device,
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
        # One history: what the checkpoint holds, nothing a killed run logged after it.
        jsonl = self.sinks.jsonl_path
        if self.env.is_main and jsonl is not None and (self.history or jsonl.exists()):
            checkpoint.rewrite_lines(jsonl, [json.dumps(record) for record in self.history])
        try:
            self.sinks.start(flatten(to_dict(cfg)), config_yaml, self.global_step)
            self.visuals.at_start(self.sinks, self.net, self.train_loader.dataset, self.train_sampler,
                                  self.device, self.global_step)
            if self.position.epoch >= cfg.train.epochs:
                log.info("nothing to do: the run in %s already finished %d epochs (train.epochs=%d); "
                         "raise train.epochs to continue it, or choose another log.name",
                         self.run_dir, self.position.epoch, cfg.train.epochs)
                return EXIT_OK
            while self.position.epoch < cfg.train.epochs:
                if (reason := self._early_stop()) is not None:
                    log.info("early stop after epoch %d: %s; best checkpoint: %s", self.position.epoch, reason,
                             checkpoint.checkpoint_dir(self.run_dir) / "best.pt")
                    break
                train_stats = self.train_epoch()
                if train_stats is None:
                    return self._stop()
                log.debug("epoch %d: validating %d samples", self.position.epoch + 1, len(self.val_loader.dataset))
                evidence = self.visuals.evidence()
                val = self.evaluate(self.eval_net, evidence)
                val_ema = self.evaluate(self.step.ema.module) if self.step.ema else None
                if distributed.any_rank(self.env, [self.stop.requested])[0]:  # a stop during validation
                    return self._stop()
                self._end_epoch(train_stats, val, val_ema)
                self.visuals.at_epoch_end(self.sinks, evidence, self.net, self.position.epoch, self.global_step)
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
        cfg, accum, position, size = self.cfg, self.cfg.train.grad_accum_steps, self.position, self.train_sampler.size
        self.net.train()
        self.train_sampler.set_position(position)
        global_batches = self.train_sampler.global_batches()
        if position.consumed == 0:
            self.meter = TrainMeter(cfg.log.every_steps)
        self.peak_memory.reset()
        bar = ProgressBar(self.env, cfg.log.progress_bar, len(global_batches), f"epoch {position.epoch + 1}")
        started, waited, consumed_before = time.perf_counter(), 0.0, position.consumed
        window_start = position.consumed  # where the current accumulation window began
        batches = iter(self.train_loader)
        for index, global_size in enumerate(global_batches):
            self.profiler.update(self.global_step)
            wait_start = time.perf_counter()
            images, targets, skipped = next(batches)
            waited += time.perf_counter() - wait_start
            self.skipped_samples += skipped
            if index % accum == 0:
                window_start = position.consumed
            window = min(accum, len(global_batches) - (index - index % accum))
            boundary = (index + 1) % accum == 0 or index + 1 == len(global_batches)
            position.consumed += global_size
            if boundary:
                self.schedule.set_window(position.epoch + window_start / size, position.epochs_done(size))
            images, targets, stand_in = self.stand_in.swap(images, targets)
            loss = self._train_step(images, targets, window, boundary, stand_in)
            if not stand_in:
                self.meter.update(loss, targets.shape[0], self.global_step)
            bar.update()
            if boundary and self.global_step % cfg.log.every_steps == 0:
                self._flush_meter()
                running = self.meter.mean_loss()
                bar.set_postfix(loss=f"{running:.4f}")
                self.sinks.scalars({"train/loss_running": running, "train/lr": self.schedule.lr()}, self.global_step)
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
            self.global_step += 1
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
        due = ckpt.every_steps > 0 and self.global_step % ckpt.every_steps == 0
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
                    self.position.consumed, self.train_sampler.size, EXIT_STOPPED)
        # Any rank's warning counts: the stop is agreed, so rank 0 may stop before its own copy arrives.
        warned = distributed.any_rank(self.env, [ckpt.warning_signal in self.stop.received])[0]
        self.requeue = self.env.is_main and ckpt.requeue and warned and slurm.may_requeue(ckpt.max_requeues)
        return EXIT_STOPPED

    def evaluate(self, model: nn.Module, observer: EvalObserver | None = None) -> dict[str, float]:
        """Metrics of ``model`` over the whole validation set, every sample counted once across ranks.

        Every rank first takes rank 0's buffers (BatchNorm statistics, EMA-averaged buffers): each
        rank updated its own in its last steps, and rank 0's are the ones the checkpoint keeps, so
        the logged metrics are the saved model's (what ``trainer.evaluate`` reports). A stop signal
        cuts the validation short (the partial metrics are then not logged).
        """
        if self.env.is_distributed:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        try:
            metrics, skipped = evaluate_model(model, self.val_loader, len(self.classes), self.device,
                                              self.precision, self.memory_format, self.env.control,
                                              lambda: self.stop.requested, observer, normalize=self.normalize)
        except torch.OutOfMemoryError:
            batch = self.val_loader.batch_size
            raise OutOfMemory(f"{self.device} ran out of memory in validation at batch {batch} per process; "
                              f"set data.val_batch_size={max(1, (batch or 2) // 2)}") from None
        self.skipped_samples += skipped
        return metrics

    # ----------------------------------------------------------------------------- bookkeeping
    def _end_epoch(self, train: dict[str, float], val: dict[str, float], val_ema: dict[str, float] | None) -> None:
        cfg = self.cfg
        record: dict[str, Any] = {"epoch": self.position.epoch + 1, "step": self.global_step}
        record.update({f"train/{k}": v for k, v in train.items()})
        record.update({f"val/{k}": v for k, v in val.items()})
        record.update({f"val_ema/{k}": v for k, v in (val_ema or {}).items()})
        record["train/lr"] = self.schedule.lr()
        record["train/skipped_steps"] = self.step.skipped()
        record["train/global_batch"] = cfg.data.batch_size * self.env.world_size * cfg.train.grad_accum_steps
        record.update({f"train/{k}": v for k, v in self.peak_memory.read().items()})
        peak = flops.peak_tflops(self.device, self.precision.name, cfg.train.tf32, cfg.log.peak_tflops)
        record.update(flops.throughput(self.flops_per_image, train["images_per_s"], peak, self.env.world_size))
        skipped = sum(distributed.all_gather_objects(self.env, self.skipped_samples))
        if skipped:
            record["data/skipped_samples"] = skipped
            log.warning("epoch %d: skipped %d unreadable samples so far (data.on_bad_sample=skip)",
                        self.position.epoch + 1, skipped)
        value = record[cfg.ckpt.metric]  # config.validate checked that it is logged
        improved = self.best is None or (value > self.best if cfg.ckpt.mode == "max" else value < self.best)
        if improved:
            self.best = value
        self.history.append(record)
        self.position = loaders.Position(self.position.epoch + 1, 0)
        log.info("epoch %d/%d  train loss %.4f | val loss %.4f top1 %.4f top5 %.4f f1 %.4f | lr %.3g | "
                 "%.0f img/s | data wait %.0f%% | peak mem %.0f MB", record["epoch"], cfg.train.epochs,
                 train["loss"], val["loss"], val["top1"], val["top5"], val["f1"], record["train/lr"],
                 train["images_per_s"], 100 * train["data_wait"], record["train/peak_mem_mb"])
        self.sinks.epoch(record, self.global_step)
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
                 self.train_sampler.size, len(self.val_loader.dataset), cfg.data.batch_size,
                 cfg.data.batch_size * env.world_size * cfg.train.grad_accum_steps)

    def _finish(self) -> None:
        final = {k: v for k, v in self.history[-1].items() if k.startswith("val/") and k != "val/samples"}
        self.sinks.finish(flatten(to_dict(self.cfg)), final)
        ckpts = checkpoint.checkpoint_dir(self.run_dir)
        log.info("done: val top1 %.4f (best %s %.4f)", final["val/top1"], self.cfg.ckpt.metric, self.best)
        log.info("logs: %s%s", self.run_dir / "logs", self.sinks.where())
        log.info("checkpoints: %s, %s", ckpts / "last.pt", ckpts / "best.pt")

    # ----------------------------------------------------------------------------- checkpoints
    def checkpoint_pieces(self) -> dict[str, checkpoint.Stateful]:
        """The stateful pieces a checkpoint holds, in restore order (the Worker's own counters
        first: the RNG piece reads the step). Saving some of them is a collective."""
        env = self.env
        pieces: dict[str, checkpoint.Stateful] = {
            "worker": self, "model": models.unwrap(self.net), "optimizer": optim.OptimizerState(self.optimizer),
            "schedule": self.schedule, "step": self.step, "position": self.position,
            "meter": checkpoint.RankSums(env, lambda: self.meter.state().tolist(),
                                         lambda sums: self.meter.load_state(torch.tensor(sums, dtype=torch.float64))),
            "skipped_samples": checkpoint.RankSums(env, lambda: [self.skipped_samples],
                                                   lambda counts: setattr(self, "skipped_samples", int(counts[0]))),
            "rng": RankRng(env, self.cfg.train.seed, lambda: self.global_step),
            "trackers": self.sinks,
        }
        return pieces

    def state_dict(self) -> dict[str, Any]:
        """The Worker's own counters (its other state lives in :meth:`checkpoint_pieces`)."""
        return {"global_step": self.global_step, "best": self.best, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_step, self.best, self.history = state["global_step"], state["best"], state["history"]

    def save_checkpoint(self, best: bool = False) -> None:
        """Rank 0 writes ``step_<n>.pt`` atomically and points ``last.pt`` (and ``best.pt``) at it."""
        self._flush_meter()
        meta = {"classes": self.classes, "config": to_dict(self.cfg), "versions": _versions(),
                "world_size": self.env.world_size, "epoch": self.position.epoch, "global_step": self.global_step,
                "best": self.best, "history": self.history}
        state = checkpoint.capture(self.checkpoint_pieces(), meta)
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

    def resume(self, path: Path, fall_back: bool = False) -> None:
        """Continue from a checkpoint written by :meth:`save_checkpoint` (or, with ``fall_back``
        and an unreadable ``path``, from the newest older one that reads), whatever changed since:
        one line says what changed and whether the result stays bitwise exact."""
        state, path = checkpoint.load_for_resume(path, fall_back, announce=self.env.is_main)
        checkpoint.check_classes(state, self.classes, path)
        if (mismatch := checkpoint.weight_mismatch(models.unwrap(self.net), state["model"])) is not None:
            raise CheckpointError(f"{path} does not match the model ({mismatch}); "
                                  "check model.name and the number of classes")
        saved = state.get("config") or {}
        changes, inexact = checkpoint.changes_since(saved, to_dict(self.cfg), state.get("world_size", 0),
                                                    self.env.world_size)
        pieces = self.checkpoint_pieces()
        saved_optim = saved.get("optim", {})
        if (saved_optim.get("name"), saved_optim.get("decay_norm_and_bias")) != (
                self.cfg.optim.name, self.cfg.optim.decay_norm_and_bias):
            del pieces["optimizer"]
            changes.append("optimizer state not restored (another optimizer or parameter grouping)")
        checkpoint.restore(pieces, state, path)
        log.info(checkpoint.describe_changes(changes, inexact))
        log.info("resumed from %s: epoch %d, %d of %d samples done, step %d", path, self.position.epoch + 1,
                 self.position.consumed, self.train_sampler.size, self.global_step)


def _versions() -> dict[str, str]:
    import platform

    import torchvision

    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__)}
