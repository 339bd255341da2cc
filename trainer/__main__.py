"""``python -m trainer`` / ``torchrun -m trainer``: load the config, run the Worker, exit with a code."""

from __future__ import annotations

import errno
import gc
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from trainer import checkpoint, config, models
from trainer.checkpoint import runlock
from trainer.config import cli, user_code
from trainer.data import sources
from trainer.errors import EXIT_FAILURE, EXIT_HANG, EXIT_OK, EXIT_USER_ERROR, ConfigError, UserError, one_line
from trainer.observe.console import add_rank_file, log, setup_console
from trainer.parallel import distributed, flight_recorder, hangs, openmp, peers, slurm
from trainer.parallel.signals import StopRequest


def parse_args(argv: list[str] | None) -> cli.CommandLine:
    """``-c FILE``, ``--code DIR`` and config keys as ``key=value``, ``--key value`` or an alias
    (``--epochs 10 --model ResNet34``), in any order; with ``--help`` the run prints every key instead."""
    return cli.parse_command_line(sys.argv[1:] if argv is None else argv)


@record
def run(argv: list[str] | None = None) -> int:
    """Everything but the process exit: returns the exit code (see trainer.errors)."""
    # torch's import leaves ~330,000 long-lived objects that every full garbage collection would
    # rescan (0.2 s each here, a third of start-up's own work) and whose reference counts forked
    # DataLoader workers would copy: keep them out of the collector while the run lasts.
    gc.freeze()
    try:
        return _run(argv)
    finally:
        gc.unfreeze()


def _run(argv: list[str] | None) -> int:
    topology = distributed.discover()
    setup_console(topology.rank)
    debug = os.environ.get("TRAINER_DEBUG") == "1"
    env, watchdog = None, None
    try:
        args = parse_args(argv)
        if args.help:
            print(cli.help_text(), flush=True)
            return EXIT_OK
        debug = debug or any(o.strip() == "log.debug=true" for o in args.overrides)
        user_code.add_code_dirs(args.code)
        cfg = config.load(args.config, args.overrides, implied=models.implied_settings)
        # The SLURM warning signal may come (up to 60 s early) during process-group init, data
        # preparation or model building: it must not kill the process with its default action.
        # (TERM and INT keep interrupting start-up at once, as a user at a terminal expects.)
        stop = StopRequest()
        stop.install([cfg.ckpt.warning_signal])
        debug = debug or cfg.log.debug
        setup_console(topology.rank, debug)
        models.resolve_name(cfg.model.name)
        sources.check_source(cfg.data.source)
        models.check_weights(cfg.model)
        _check_model_and_optimizer(cfg)
        env = distributed.setup(cfg.dist.device, cfg.dist.backend, cfg.dist.timeout_s,
                                before_group=lambda backend: _record_collectives(cfg, backend))
        log.debug("%s, %d torch threads", openmp.describe_wait_policy(), torch.get_num_threads())
        resume_from = _resume_source(cfg.ckpt.resume, cfg.run_dir.resolve())
        run_dir, lock = _agree_run_dir(env, cfg)
        watchdog = hangs.Watchdog(env, run_dir, cfg.dist.timeout_s) if env.is_distributed else None
        try:
            from trainer.train.worker import Worker

            worker = Worker(cfg, env, run_dir, stop)
            if resume_from is not None:
                worker.resume(resume_from, fall_back=cfg.ckpt.resume == "auto")
            _save_config(env, cfg, run_dir)  # only now: a refused start leaves the run's config.yaml as it was
            stop.install(sorted({"SIGTERM", "SIGINT", cfg.ckpt.warning_signal}))
            code = worker.fit()
            requeue = worker.requeue
            del worker
        finally:
            if lock is not None:
                lock.release()
        # Before teardown's barrier, which holds the other ranks: on several nodes, the first node
        # to exit makes srun (--kill-on-bad-exit) end the step, rank 0 included, within KillWait.
        if requeue:
            slurm.requeue()
        if watchdog is not None:
            watchdog.close()
        distributed.teardown(env)
        return code
    except UserError as exc:
        if debug:
            traceback.print_exc()
        if topology.rank == 0 or not isinstance(exc, ConfigError):
            prefix = "error" if topology.rank == 0 else f"error [rank {topology.rank}]"
            _error_line(f"{prefix}: {one_line(exc)}")
        return EXIT_USER_ERROR
    except Exception as exc:
        if env is None or not env.is_distributed or not peers.is_peer_failure(exc) or debug:
            raise
        if watchdog is not None and (verdict := _hang_verdict(watchdog, exc)) is not None:
            _error_line(f"error [rank {topology.rank}]: {verdict}")
            hangs.tell_torchrun(verdict)
            return EXIT_HANG
        _error_line(f"error [rank {topology.rank}]: {peers.describe(env, exc)}")
        return EXIT_FAILURE


def _check_model_and_optimizer(cfg: config.Config) -> None:
    """What the model and the optimizer would refuse when they are built, found before the process
    group, the data and the run directory: a timm optimizer without timm, a ``model.drop_path``
    the model does not take, ``optim.layer_decay`` for a model without ViT blocks."""
    from trainer.train import optim

    optim.check_available(cfg.optim)
    if cfg.model.drop_path is None and cfg.optim.layer_decay == 1:
        return
    shape = models.sketch(cfg.model, cfg.data.image_size)
    if shape is not None and cfg.optim.layer_decay < 1:
        optim.layer_scales(shape, cfg.optim.layer_decay)


def _record_collectives(cfg: config.Config, backend: str) -> None:
    """Turn torch's flight recorder on or off as ``dist.flight_recorder`` says (before the group exists)."""
    kept = flight_recorder.configure(cfg.dist.flight_recorder, cfg.dist.flight_recorder_entries, backend == "nccl",
                                     cfg.run_dir.resolve())
    if kept:
        log.debug("flight recorder: %s from the environment", ", ".join(kept))


def _error_line(line: str) -> None:
    """``line`` on stderr in one write: the ranks of a job share the stream, and ``print`` writes
    the newline apart, so two ranks' lines could run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _hang_verdict(watchdog: hangs.Watchdog, exc: BaseException) -> str | None:
    """The hang's verdict, agreed through the rendezvous store; None when the store is gone too
    (node 0 died: :func:`peers.describe` says so)."""
    try:
        return watchdog.verdict(exc, hangs.current_timeout())
    except (RuntimeError, OSError):
        return None


def _agree_run_dir(env: distributed.DistEnv, cfg: config.Config) -> tuple[Path, runlock.RunLock | None]:
    """Rank 0 creates the run directory, checks it is writable and takes its lock (another live
    run there is refused), writing nothing else in it yet (see :func:`_save_config`); every rank
    then uses it."""
    run_dir = cfg.run_dir.resolve()
    held: list[runlock.RunLock] = []

    def create() -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(run_dir, os.W_OK):  # also EROFS for root
            read_only = os.statvfs(run_dir).f_flag & os.ST_RDONLY
            raise OSError(errno.EROFS, os.strerror(errno.EROFS)) if read_only else OSError(errno.EACCES, "not writable")
        held.append(runlock.acquire(run_dir))  # before any rank writes its log there

    _on_rank0(env, create, f"cannot write the run directory {run_dir}", "choose a writable log.output_dir")
    add_rank_file(run_dir, env.rank)
    return run_dir, (held[0] if held else None)


def _save_config(env: distributed.DistEnv, cfg: config.Config, run_dir: Path) -> None:
    """Rank 0 saves the resolved config, once data, model and checkpoint have checked out."""
    path = run_dir / "config.yaml"
    _on_rank0(env, lambda: path.write_text(config.to_yaml(cfg)), f"cannot write {path}",
              "free some space or choose a writable log.output_dir")


def _on_rank0(env: distributed.DistEnv, action: Callable[[], object], failure: str, fix: str) -> None:
    """Run file-system ``action`` on rank 0; if it fails, every rank raises the same UserError."""
    problem = None
    if env.is_main:
        try:
            action()
        except OSError as exc:
            problem = f"{failure} ({exc.strerror or exc}); {fix}"
        except UserError as exc:
            problem = str(exc)
    problem = distributed.broadcast_object(env, problem)
    if problem:
        raise UserError(problem)


def _resume_source(resume: str, run_dir: Path) -> Path | None:
    """``auto``: the run directory's latest checkpoint, if any; ``never``; or an explicit path."""
    found = checkpoint.latest(run_dir)
    if resume == "auto":
        return found
    if resume == "never":
        if found is not None:
            raise ConfigError(f"ckpt.resume=never but {run_dir} already holds checkpoints; "
                              "choose another log.name, or ckpt.resume=auto to continue it")
        return None
    path = Path(resume).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt.resume: checkpoint '{path}' not found (use auto, never or a file path)")
    return path


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run, flush every sink, and exit without running interpreter teardown.

    ``os._exit`` avoids a gloo thread aborting the process while Python finalizes.
    """
    code = run(argv)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
