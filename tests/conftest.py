"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import slurm_cluster as slurm_local


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
