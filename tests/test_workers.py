"""``data.num_workers``: the count ``auto`` picks from the cores per process, the main process's
thread budget, the prefetch per worker, and the one-line refusal of bad values."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, small_run

from trainer import config
from trainer.data import loaders, workers
from trainer.errors import ConfigError


@pytest.mark.parametrize("affinity, quota, local, per_task, by_slurm, expected", [
    (16, None, 1, None, False, 16),  # the whole machine
    (16, None, 4, None, False, 4),  # torchrun: 4 local ranks share the mask
    (64, 8.0, 1, None, False, 8),  # docker run --cpus=8 on a 64-core host
    (64, 2.5, 1, None, False, 2),  # a fractional quota rounds down
    (64, 0.5, 1, None, False, 1),  # never below one core
    (128, None, 4, 8, True, 8),  # srun started 4 tasks of 8 cpus each, no binding: the task's 8
    (8, None, 4, 8, True, 8),  # the same, bound: the mask is the task's own
    (128, None, 4, 32, False, 8),  # one SLURM task of 32 cpus running torchrun with 4 ranks
    (4, None, 8, None, False, 1),  # more ranks than cores
])
def test_cores_per_process(affinity: int, quota: float | None, local: int, per_task: int | None, by_slurm: bool,
                           expected: int) -> None:
    cores = workers.cores_per_process(affinity, quota, local, per_task, by_slurm)
    assert cores.per_process == expected
    assert f"{affinity} in the affinity mask" in cores.seen


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_quota_from_real_files(tmp_path: Path) -> None:
    """cgroup v2: the smallest cpu.max from the process's group up; unlimited is None; v1's cfs files."""
    write(tmp_path / "cpu.max", "max 100000\n")
    assert workers.cgroup_cpu_limit(tmp_path, "/") is None
    write(tmp_path / "job" / "cpu.max", "400000 100000\n")
    write(tmp_path / "job" / "step" / "cpu.max", "max 100000\n")
    assert workers.cgroup_cpu_limit(tmp_path, "/job/step") == 4.0  # the parent's limit holds its children
    write(tmp_path / "job" / "step" / "cpu.max", "150000 100000\n")
    assert workers.cgroup_cpu_limit(tmp_path, "/job/step") == 1.5
    assert workers.cgroup_cpu_limit(tmp_path / "absent", "/") is None
    v1 = tmp_path / "v1"
    write(v1 / "cpu" / "cpu.cfs_quota_us", "-1\n")
    write(v1 / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert workers.cgroup_cpu_limit(v1, "/") is None
    write(v1 / "cpu" / "cpu.cfs_quota_us", "300000\n")
    assert workers.cgroup_cpu_limit(v1, "/") == 3.0


@pytest.mark.parametrize("cores, accelerator, expected_workers, expected_threads", [
    (16, True, 15, 1),  # a GPU process keeps one core: launching kernels, reading and pinning batches
    (64, True, workers.MAX_AUTO_WORKERS, 32),
    (2, True, 1, 1),
    (1, True, 1, 1),  # at least one worker
    (16, False, 4, 12),  # on the CPU the main process computes: a quarter to the workers
    (2, False, 1, 1),
])
def test_auto_count_and_thread_budget(cores: int, accelerator: bool, expected_workers: int,
                                      expected_threads: int) -> None:
    count = workers.auto_workers(cores, accelerator)
    assert count == expected_workers
    assert workers.main_threads(cores, count) == expected_threads


def test_plan_reads_the_environment(tmp_path: Path) -> None:
    write(tmp_path / "cpu.max", "max 100000\n")
    environ = {"LOCAL_WORLD_SIZE": "2"}
    plan = workers.plan("auto", "cuda", environ, affinity=16, cgroup_root=tmp_path)
    assert (plan.workers, plan.main_threads, plan.cores.per_process) == (7, 1, 8)
    assert "16 in the affinity mask, 2 local processes" in plan.describe("auto")
    assert workers.plan("auto", "cuda", {**environ, "OMP_NUM_THREADS": "3"}, 16, tmp_path).main_threads is None
    fixed = workers.plan(5, "cuda", environ, affinity=16, cgroup_root=tmp_path)
    assert (fixed.workers, fixed.main_threads) == (5, None)  # an integer is taken as is, threads untouched


def test_prefetch_keeps_the_batches_in_flight_bounded() -> None:
    assert [workers.prefetch_factor(n) for n in (0, 1, 4, 5, 8, 15, 32)] == [0, 4, 4, 4, 2, 2, 2]
    cfg = config.load([], ["data.num_workers=15"]).data
    options = loaders._loader_options(cfg, torch.device("cpu"), 0)
    assert (options["num_workers"], options["prefetch_factor"]) == (15, 2)
    assert loaders._loader_options(config.load([], ["data.num_workers=0"]).data, torch.device("cpu"), 0)[
        "prefetch_factor"] is None


@pytest.mark.parametrize("value, expected", [("4", 4), ("0", 0), ("auto", "auto"), ("AUTO", "auto")])
def test_num_workers_takes_integers_and_auto(value: str, expected: int | str) -> None:
    assert config.load([], [f"data.num_workers={value}"]).data.num_workers == expected


@pytest.mark.parametrize("value", ["-1", "2.5", "true", "many", "[2]"])
def test_num_workers_refuses_other_values(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^data.num_workers: an integer >= 0 or auto"):
        config.load([], [f"data.num_workers={value}"])


def child_env(**extra: str) -> dict[str, str]:
    """This environment without the thread count tests usually pin, so that auto sets it."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "RANK", "WORLD_SIZE") and not k.startswith("SLURM_")}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def test_a_run_with_auto_logs_its_choice_once_and_cuts_the_main_threads(tmp_path: Path) -> None:
    """A real run on this machine's cores: the line with the count and the cores it saw, once; the
    main process's torch threads are the cores the workers leave."""
    cores = len(os.sched_getaffinity(0))
    expected = workers.auto_workers(cores, accelerator=False)
    threads = workers.main_threads(cores, expected)
    script = ("import os, sys, torch; from trainer.__main__ import run; code = run(sys.argv[1:]); "
              "print('threads', torch.get_num_threads(), flush=True); os._exit(code)")
    args = small_run(tmp_path, "log.name=auto", "data.num_workers=auto", "train.epochs=1", "dist.device=cpu",
                     "data.persistent_workers=false", train_per_class=8, val_per_class=2)
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if "loader worker(s) per process" in line]
    assert lines == [f"data: {expected} loader worker(s) per process (data.num_workers=auto; {cores} core(s) each: "
                     f"{cores} in the affinity mask), main process {threads} OpenMP thread(s)"], done.stdout
    assert f"threads {threads}" in done.stdout


def test_a_bad_value_on_the_command_line_exits_2_with_one_line(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "trainer", "data.num_workers=some", f"log.output_dir={tmp_path}"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == ["error: data.num_workers: an integer >= 0 or auto (a count from the cores "
                                        "per process), got 'some'"]
