"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fuzzing
import pytest
import slurm_cluster as slurm_local

SHARED_CLUSTER_MODULES = ("test_slurm.py", "test_multihost.py")
"""Modules that start SLURM daemons (one local cluster, or two in network namespaces): never at once."""


LONGEST_FIRST = ("test_slurm.py", "test_multihost.py", "test_resume.py", "test_sharding.py", "test_byo.py",
                 "test_errors.py", "test_train.py", "test_converge.py", "test_training_features.py", "test_faults.py",
                 "test_micro_batch.py", "test_hangs.py", "test_prepare.py", "test_bench.py", "test_recipes.py",
                 "test_trackers.py", "test_tasks.py", "test_device_decode.py", "test_lr_scaling.py")
"""The modules that take longest (``--durations``), longest first: under ``-n 2`` the long units
start early and short ones fill the end, so both workers finish at about the same time."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run :data:`LONGEST_FIRST` before the other modules (each module's own order is kept)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under ``pytest -n N`` (``make test``): one module is one unit of work, so a module-scoped
    fixture runs once, and the SLURM modules form a single unit, run one after the other."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "slurm" if Path(module).name in SHARED_CLUSTER_MODULES else module

    return ModuleScheduling(config, log)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The reader fuzz's cases and outcomes per reader (tests/fuzzing.py), when it ran in this process."""
    lines = fuzzing.summary()
    if lines:
        terminalreporter.write_sep("=", f"reader fuzz (FUZZ_SCALE={fuzzing.SCALE:g})")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[slurm_local.SlurmCluster]:
    """A real single-node SLURM cluster (2 CPUs), up once per session, torn down by PID at its end.

    Skipped with the reason when it cannot run here (not root, no SLURM and no apt).
    See tests/slurm_cluster.py and tests/slurm_local/.
    """
    log_path = tmp_path_factory.mktemp("slurm-cluster") / "setup.log"
    try:
        cluster = slurm_local.start(log_path, ncpus=2)
    except slurm_local.ClusterUnavailable as exc:
        pytest.skip(f"no local SLURM cluster: {exc}")
    try:
        yield cluster
    finally:
        cluster.cancel_all()
        cluster.stop()
