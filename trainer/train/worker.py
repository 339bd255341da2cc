"""The training loop: one process of the job, orchestrating data, model, task and sinks."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint, models
from trainer.config import Config, flatten, profile_range, to_dict, to_yaml
from trainer.data import policies
from trainer.data.device_decode import DeviceDecoder
from trainer.data.erasing import RandomErasing
from trainer.data.loaders import Position, train_crop_size
from trainer.data.mixing import Mixing
from trainer.data.stages import DeviceStages, Normalize
from trainer.errors import EXIT_OK, EXIT_STOPPED, StorageError
from trainer.models import flops
from trainer.observe.console import log
from trainer.observe.memory import model_memory_mb
from trainer.observe.profiling import StepProfiler
from trainer.observe.sinks import MetricSinks
from trainer.observe.stragglers import OwnTime, StragglerWatch
from trainer.observe.visuals import RunVisuals
from trainer.parallel import choice, distributed, hangs
from trainer.parallel.distributed import DistEnv, LaggedAgreement
from trainer.parallel.seeding import RankRng, rank_seed, seed_everything
from trainer.parallel.signals import StopRequest
from trainer.tasks.registry import build_task
from trainer.train import optim, precision
from trainer.train.checkpointing import RunCheckpoints
from trainer.train.epoch import EpochLoop
from trainer.train.evaluation import Validation
from trainer.train.inputs import build_inputs
from trainer.train.micro_batch import MicroBatchChoice, has_batchnorm
from trainer.train.records import RunRecord, epoch_line, epoch_record
from trainer.train.step import TrainStep
from trainer.train.stopping import StopPolicy


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
        self.parallel = choice.build(env, cfg.dist, cfg.model.compile, self.precision.name)
        # Sharded: built without the parameters' memory, given its values shard by shard once sharded.
        materialise = None
        if self.parallel.shards_parameters and models.builds_deferred(cfg):
            self.net, materialise = models.build_deferred(cfg, len(self.classes))
        else:
            self.net = models.build_for_training(cfg, len(self.classes))
        memory_format = models.memory_format(cfg.model.channels_last)
        if not self.parallel.shards_parameters:
            self.net.to(self.device, memory_format=memory_format)
        elif materialise is None:  # FSDP takes contiguous parameters only: channels_last is the inputs' layout
            self.net.to(self.device)
        # Sharded, the blocks are compiled in place (see Parallel.wrap): the evaluation runs them as they are.
        self.eval_net = torch.compile(self.net) if cfg.model.compile and not self.parallel.shards_parameters \
            else self.net
        # Counted on the meta device before any hook or sharding touches the model.
        self.flops_per_image = (flops.training_flops_per_image(self.net, train_crop_size(cfg.data))
                                if env.is_main else None)
        ema_copy = copy.deepcopy(self.net) if cfg.train.ema_decay > 0 else None  # before hooks and shards
        self.model = self._distribute(self.net)
        ema_module = self.parallel.spread_copy(ema_copy, self._blocks(ema_copy)) if ema_copy is not None else None
        if materialise is not None:
            materialise(self.net, self.device)
            if ema_module is not None:
                models.copy_values(self.net, ema_module)
        fine_tuning = cfg.optim.head_lr_mult != 1 or cfg.model.freeze != "none"
        head = models.head_parameter_names(self.net) if fine_tuning else set()
        self.peak = optim.PeakLr(cfg.optim, optim.global_batch(cfg, env.world_size))  # a resume may keep another
        # After sharding: fully_shard replaces the parameters the optimizer must hold.
        self.optimizer = optim.build_optimizer(self.net, cfg.optim, self.device, head, self.peak.value)
        frozen_epochs = cfg.train.freeze_epochs if cfg.model.freeze == "backbone" else 0
        self.schedule = optim.Schedule(self.optimizer, optim.with_warmup_floor(cfg.sched, self.inputs.sampler.size),
                                       cfg.train.epochs, frozen_epochs, self.peak)
        self.normalize = Normalize(cfg.data.mean, cfg.data.std, self.device)
        training_stages = [RandomErasing(cfg.data.random_erase)] if cfg.data.random_erase > 0 else []
        if cfg.data.mixup_alpha > 0 or cfg.data.cutmix_alpha > 0:  # after erasing, as in torchvision's recipes
            training_stages.append(Mixing(len(self.classes), cfg.data.mixup_alpha, cfg.data.cutmix_alpha,
                                          cfg.data.mixup_prob, cfg.data.mixup_switch_prob))
        decoder = (DeviceDecoder(self.device, memory_format, policies.build_policy(cfg.data))
                   if self.inputs.device_decode else None)
        self.stages = DeviceStages(self.normalize, self.device, cfg.train.seed, memory_format, training_stages,
                                   decoder)
        self.micro_batches = self._micro_batches()
        self.step = TrainStep(self.net, self.model, self.optimizer, self.parallel, self.task, self.precision,
                              self.device, cfg.train, ema_module, self.micro_batches)
        seed_everything(rank_seed(cfg.train.seed, env.rank))  # DDP has broadcast the weights: now masks differ
        self.position, self.record, self.requeue = Position(), RunRecord(cfg.ckpt.metric, cfg.ckpt.mode), False
        self.agreement = LaggedAgreement(env)
        self.policy = StopPolicy(cfg.ckpt, env, stop, self.agreement)
        self.validation = Validation(self.inputs.val_loader, self.task, len(self.classes), self.stages,
                                     self.precision, self.parallel, env.control, lambda: self.stop.requested,
                                     self.micro_batches.val)
        self.checkpoints = RunCheckpoints(cfg, env, run_dir, self.classes)
        self.parallel.sharded_state = self.checkpoints.sharded
        self.sinks = MetricSinks(env, run_dir, cfg.log)
        self.visuals = RunVisuals(cfg, env, run_dir, self.classes, self.normalize, self.task)
        self.profiler = StepProfiler(profile_range(cfg.log.profile_steps), env.rank, self.device, run_dir,
                                     quiesce=self.agreement.quiesce)
        self.loop = EpochLoop(cfg, env, self.inputs, self.stages, self.step, self.schedule, self.record, self.policy,
                              self.sinks, self.profiler, self.save_checkpoint, self._straggler_watch())

    def _distribute(self, net: torch.nn.Module) -> torch.nn.Module:
        """The model as the step runs it: blocks checkpointed, then spread over the ranks."""
        mode = self.cfg.train.activation_checkpointing
        if mode != "none":
            models.checkpoint_activations(models.find_blocks(net, self.cfg.dist.shard_blocks), mode)
        return self.parallel.wrap(net, self._blocks(net))

    def _micro_batches(self) -> MicroBatchChoice:
        """How batches are cut for the forward pass (``train.micro_batch``); under auto, below what a
        backward pass out of memory left in the run directory."""
        cfg = self.cfg
        auto = cfg.train.micro_batch == "auto"
        choice = MicroBatchChoice(self.env, auto, cfg.data.batch_size, cfg.data.val_batch_size or cfg.data.batch_size,
                                  cfg.train.grad_accum_steps, self.run_dir)
        if auto and self.env.is_main and has_batchnorm(self.net):
            log.warning("train.micro_batch=auto and the model has BatchNorm: if a batch runs out of memory and is "
                        "cut into smaller micro-batches, its batch statistics come from fewer samples")
        choice.read_note()
        return choice

    def _straggler_watch(self) -> StragglerWatch | None:
        """Each rank's own time per step, compared every ``log.every_steps`` (``log.straggler_ratio``)."""
        cfg, env = self.cfg, self.env
        if cfg.log.straggler_ratio == 0 or not env.is_distributed or env.world_size < 2:
            return None
        if not self.parallel.waits_outside_compute:
            log.info("log.straggler_ratio: no rank is named under dist.strategy=%s: its forward and backward "
                     "gather and reduce across ranks, so every rank's compute holds the slowest one's",
                     cfg.dist.strategy)
            return None
        clock = OwnTime(self.device)
        clock.attach(self.net, cfg.model.compile)
        return StragglerWatch(env, cfg.log.straggler_ratio, clock)

    def _blocks(self, net: torch.nn.Module) -> list[torch.nn.Module]:
        """The units a sharded strategy spreads ``net`` by (none for the others)."""
        sharded = self.cfg.dist.strategy != "ddp" and self.env.is_distributed
        return models.find_blocks(net, self.cfg.dist.shard_blocks) if sharded else []

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
            self.visuals.at_start(self.sinks, self.net, self.inputs.pictured_set, self.inputs.sampler, self.device,
                                  self.record.global_step)
            if self.position.epoch >= cfg.train.epochs:
                log.info("nothing to do: the run in %s already finished %d epochs (train.epochs=%d); "
                         "raise train.epochs to continue it, or choose another log.name",
                         self.run_dir, self.position.epoch, cfg.train.epochs)
                return EXIT_OK
            while self.position.epoch < cfg.train.epochs:
                if (reason := self._early_stop()) is not None:
                    log.info("early stop after epoch %d: %s; best checkpoint: %s", self.position.epoch, reason,
                             self.checkpoints.best)
                    break
                train_stats = self.train_epoch()
                if train_stats is None:
                    return self._stop()
                hangs.TRAIL.at("validation", self.record.global_step)
                log.debug("epoch %d: validating %d samples", self.position.epoch + 1,
                          len(self.inputs.val_loader.dataset))
                evidence = self.visuals.evidence()
                val = self.evaluate(self.eval_net, evidence)
                val_ema = self.evaluate(self.step.ema.module) if self.step.ema else None
                if self.policy.requested_anywhere():  # a stop during validation
                    return self._stop()
                self._end_epoch(train_stats, val, val_ema)
                self.visuals.at_epoch_end(self.sinks, evidence, self.net, self.position.epoch, self.record.global_step)
            self.checkpoints.wait()
            self._finish()
            return EXIT_OK
        finally:
            self.profiler.close()
            self.sinks.close()

    def train_epoch(self) -> dict[str, float] | None:
        """The rest of the current epoch (see :meth:`EpochLoop.run`); None if a stop was requested."""
        return self.loop.run(self.position)

    def _stop(self) -> int:
        """Save where the loop stopped; on the warning signal, ask for a SLURM requeue after teardown."""
        self.agreement.settle(2)
        self.save_checkpoint()
        self.checkpoints.wait()  # ckpt.async_save: the shards are on disk before the process exits
        log.warning("stopped by %s at epoch %d, %d of %d samples; checkpoint saved, exit code %d",
                    self.stop.signal_name or "a signal on another rank", self.position.epoch + 1,
                    self.position.consumed, self.inputs.sampler.size, EXIT_STOPPED)
        self.requeue = self.policy.requeue()
        return EXIT_STOPPED

    def evaluate(self, model: torch.nn.Module, observer: Any = None) -> dict[str, float]:
        """Metrics of ``model`` over the whole validation set (see :class:`Validation`)."""
        metrics, skipped = self.validation(model, observer)
        self.loop.skipped_samples += skipped
        return metrics

    def _end_epoch(self, train: dict[str, float], val: dict[str, float], val_ema: dict[str, float] | None) -> None:
        cfg, env, epoch = self.cfg, self.env, self.position.epoch + 1
        record = epoch_record(epoch, self.record.global_step, train, val, val_ema, lr=self.schedule.lr(),
                              skipped_steps=self.step.skipped(),
                              global_batch=optim.global_batch(cfg, env.world_size),
                              **self.micro_batches.record(), **self.loop.peak_memory.read())
        peak = flops.peak_tflops(self.device, self.precision.name, cfg.train.tf32, cfg.log.peak_tflops)
        record.update(flops.throughput(self.flops_per_image, train["images_per_s"], peak, env.world_size))
        record.update(model_memory_mb(self.net, self.optimizer))
        if skipped := sum(distributed.all_gather_objects(env, self.loop.skipped_samples)):
            record["data/skipped_samples"] = skipped
            log.warning("epoch %d: skipped %d unreadable samples so far (data.on_bad_sample=skip)", epoch, skipped)
        improved = self.record.add(record)
        self.position = Position(epoch, 0)
        log.info(epoch_line(record, cfg.train.epochs, self.task.summary(val)))
        self._log_epoch(record)
        self.save_checkpoint(best=improved)

    def _log_epoch(self, record: dict[str, Any]) -> None:
        """The epoch's record to the sinks (rank 0); a metrics.jsonl line it cannot write (a full
        disk) stops every rank with its one line, before the checkpoint (a collective)."""
        problem = None
        try:
            self.sinks.epoch(record, self.record.global_step)
        except StorageError as exc:
            problem = str(exc)
        if (problem := distributed.broadcast_object(self.env, problem)) is not None:
            raise StorageError(problem)

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
        log.info("run %s | %d process(es) on %s (%s) | %s | model %s, %s parameters, %s training FLOPs per image | "
                 "precision %s | task %s, %d classes, %d train / %d val samples | batch %d per process, %d global",
                 self.run_dir, env.world_size, self.device, env.backend or "no process group", self._held(),
                 models.resolve_name(cfg.model.name), f"{models.count_parameters(self.net):,}",
                 flops.short(self.flops_per_image), self.precision.name, self.task.name, len(self.classes),
                 self.inputs.sampler.size, len(self.inputs.val_loader.dataset), cfg.data.batch_size,
                 optim.global_batch(cfg, env.world_size))
        sched = self.schedule.cfg
        log.info("%s | warmup %.3g epoch(s) from %g x peak, then %s to epoch %d", self.peak.describe(),
                 min(sched.warmup_epochs, cfg.train.epochs), sched.warmup_start_factor, sched.name, cfg.train.epochs)

    def _held(self) -> str:
        """What each process holds of the model, e.g. ``fsdp: 21.3 MB of parameters and 21.3 MB of
        gradients per process`` (its optimizer state is in the epoch's metrics, from the first step on)."""
        held = model_memory_mb(self.net, self.optimizer)
        strategy = self.cfg.dist.strategy if self.env.is_distributed else "one process"
        return (f"{strategy}: {held['memory/parameters_mb']:.1f} MB of parameters and "
                f"{held['memory/gradients_mb']:.1f} MB of gradients per process")

    def _finish(self) -> None:
        metric, history = self.cfg.ckpt.metric, self.record.history
        self.sinks.finish(flatten(to_dict(self.cfg)),
                          {k: v for k, v in history[-1].items() if k.startswith("val/") and k != "val/samples"})
        log.info("done: %s %.4f (best %s %.4f)", metric, history[-1][metric], metric, self.record.best)
        log.info("logs: %s%s", self.run_dir / "logs", self.sinks.where())
        log.info("checkpoints: %s, %s", self.checkpoints.last, self.checkpoints.best)

    # ----------------------------------------------------------------------------- checkpoints
    def checkpoint_pieces(self) -> dict[str, checkpoint.Stateful]:
        """The stateful pieces a checkpoint holds, in restore order (the Worker's own counters
        first: the RNG piece reads the step). Saving some of them is a collective."""
        return {
            "worker": self.record,
            **self.parallel.checkpoint_pieces(self.net, self.optimizer),
            "schedule": self.schedule, "step": self.step, "position": self.position,
            **self.loop.checkpoint_pieces(),
            "rng": RankRng(self.env, self.cfg.train.seed, lambda: self.record.global_step),
            "trackers": self.sinks,
        }

    def save_checkpoint(self, best: bool = False) -> None:
        """Every rank: the pieces' state; rank 0 writes it (see :class:`RunCheckpoints`)."""
        hangs.TRAIL.at("checkpoint", self.record.global_step)
        self.loop.flush_meter(self.position.epoch)
        meta = {"epoch": self.position.epoch, "global_step": self.record.global_step, "best": self.record.best,
                "history": self.record.history}
        self.checkpoints.save(self.checkpoint_pieces(), meta, self.record.global_step, best)
        self.policy.saved()

    def resume(self, path: Path, fall_back: bool = False) -> None:
        """Continue from a checkpoint written by :meth:`save_checkpoint` (see :meth:`RunCheckpoints.resume`)."""
        path = self.checkpoints.resume(path, fall_back, self.checkpoint_pieces(), self.net)
        log.info("resumed from %s: epoch %d, %d of %d samples done, step %d", path, self.position.epoch + 1,
                 self.position.consumed, self.inputs.sampler.size, self.record.global_step)
