"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import slurm_cluster as slurm_local

SHARED_CLUSTER_MODULES = ("test_slurm", "test_multihost")
"""Modules that start SLURM daemons (one local cluster, or two in network namespaces): never at once."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``pytest -n N --dist loadgroup`` (``make test``), keep each module on one worker, so a
    module-scoped fixture runs once, and run the SLURM modules one after the other on one worker."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else item.nodeid
        group = "slurm" if module in SHARED_CLUSTER_MODULES else module
        item.add_marker(pytest.mark.xdist_group(group))


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
