"""The OpenMP wait policy chosen per run (trainer/openmp.py), before torch is imported."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import REPO

from trainer.parallel import openmp


@pytest.mark.parametrize("environ, cores, expected", [
    ({}, 2, None),  # one process next to its loader workers: OpenMP's default, as a user's script
    ({"OMP_WAIT_POLICY": "ACTIVE", "LOCAL_WORLD_SIZE": "8"}, 2, "ACTIVE"),  # the user's choice wins
    ({"LOCAL_WORLD_SIZE": "4", "OMP_NUM_THREADS": "1"}, 2, "PASSIVE"),  # 4 ranks x 1 thread > 2 cores
    ({"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}, 2, None),  # torchrun's 1 thread each: fits
    ({"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "4"}, 8, None),
    ({"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "4"}, 4, "PASSIVE"),  # affinity: 4 usable cores
    ({"SLURM_NTASKS": "6", "SLURM_PROCID": "1", "SLURM_NTASKS_PER_NODE": "3(x2)"}, 2, "PASSIVE"),
    ({"LOCAL_WORLD_SIZE": "3"}, 4, None),  # no OMP_NUM_THREADS: each takes its share, 3 x 1
])
def test_wait_policy_fits_the_run(environ: dict, cores: int, expected: str | None) -> None:
    policy, reason = openmp.choose_wait_policy(environ, cores)
    assert policy == expected, reason
    assert reason


def test_a_worker_process_sets_it_before_torch_loads_and_the_bench_restores_the_users() -> None:
    """Real processes: 3 local ranks x 1 thread on at most 2 usable cores sleep at once; the user's
    own setting is kept; the environment handed to a user's script is the one the user gave."""
    script = ("import os, trainer, torch; from trainer import openmp; "
              "print(os.environ.get('OMP_WAIT_POLICY'), openmp.user_environment().get('OMP_WAIT_POLICY'))")
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "LOCAL_WORLD_SIZE")}
    crowded = {**base, "LOCAL_WORLD_SIZE": str((os.cpu_count() or 1) + 1), "OMP_NUM_THREADS": "1"}
    for env, expected in ((crowded, "PASSIVE None"), ({**crowded, "OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE ACTIVE")):
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                              capture_output=True, text=True, timeout=120)
        assert done.stdout.split() == expected.split(), done.stderr[-2000:]
