"""A real two-node SLURM cluster on the two simulated hosts of tests/netns.py.

Node ``nodea`` (slurmctld and a slurmd) lives in host 0's network namespace, ``nodeb`` (a slurmd)
in host 1's. Each daemon also gets a UTS namespace with its node's host name and a mount namespace
whose /etc/hosts names both nodes, so ``hostname``, ``scontrol show hostnames`` and the resolver
agree as on a real cluster (/sys, and with it the cgroup mounts slurmd insists on, stays the
host's: the daemons enter the network namespace with nsenter, not ``ip netns exec``).

Nothing is shared with the single-node cluster of tests/slurm_cluster.py (which may run on the same
machine): our own munged (socket, key) and slurm.conf (``SLURM_CONF``) under a temporary folder,
our own pid, spool, state and log files. Teardown kills our daemons by PID (and the netns fixture
kills whatever is left in the namespaces).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from netns import Host
from slurm_cluster import FINISHED, ClusterUnavailable, unavailable_reason

NODES = ("nodea", "nodeb")


@dataclass
class TwoNodeCluster:
    """Clients run on nodea (host 0), with our ``SLURM_CONF``."""

    folder: Path
    hosts: tuple[Host, Host]
    env: dict[str, str]
    jobs: list[str] = field(default_factory=list)

    def run(self, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) \
            -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.hosts[0].namespace, *argv], capture_output=True,
                              text=True, timeout=60, cwd=cwd, env={**(env or os.environ), **self.env})

    def sbatch(self, args: list[str], *, cwd: Path, env: dict[str, str]) -> str:
        out = self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd)
        assert out.returncode == 0, f"sbatch {' '.join(args)} failed: {out.stderr.strip()}"
        job = out.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def job(self, job_id: str) -> dict[str, str]:
        fields: dict[str, str] = {}
        for token in self.run(["scontrol", "show", "job", "-o", job_id]).stdout.split():
            key, sep, value = token.partition("=")
            if sep and key not in fields:
                fields[key] = value
        return fields

    def wait_for(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states or info.get("JobState") in FINISHED:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s")
            time.sleep(0.5)

    def start_requeued_soon(self, job_id: str, settle_s: float = 4.0) -> None:
        """As in tests/slurm_cluster.py: not at once, or slurmd rejects the new credential."""
        time.sleep(settle_s)
        self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])

    def cancel(self, job_id: str, *extra: str) -> None:
        self.run(["scancel", *extra, job_id])


@contextmanager
def two_node_cluster(hosts: tuple[Host, Host], folder: Path) -> Iterator[TwoNodeCluster]:
    """Start munged, slurmctld and two slurmd; stop them by PID on exit."""
    reason = unavailable_reason()
    if reason:
        raise ClusterUnavailable(reason)
    _install()
    folder.mkdir(parents=True, exist_ok=True)
    munge = Path(tempfile.mkdtemp(prefix="netns-munge-"))  # munged needs every parent folder open to all
    spool = Path(tempfile.mkdtemp(prefix="netns-spool-"))  # slurmd's step sockets: a unix path has 108 bytes
    for sub in (folder / "state", folder / "log", *(spool / node for node in NODES)):
        sub.mkdir(parents=True, exist_ok=True)
    hosts_file = "127.0.0.1 localhost\n" + "".join(f"{h.address} {n}\n" for h, n in zip(hosts, NODES))
    (folder / "hosts").write_text(hosts_file)
    pidfiles = [munge / "pid"]
    try:
        (munge / "key").write_bytes(os.urandom(1024))
        shutil.chown(munge, "munge", "munge")
        shutil.chown(munge / "key", "munge", "munge")
        munge.chmod(0o755)
        (munge / "key").chmod(0o400)
        socket = munge / "socket"
        _check(["runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={socket}", f"--key-file={munge / 'key'}",
                f"--pid-file={munge / 'pid'}", f"--seed-file={munge / 'seed'}", f"--log-file={munge / 'log'}"])
        conf = folder / "slurm.conf"
        conf.write_text(_slurm_conf(folder, spool, socket, hosts))
        env = {"SLURM_CONF": str(conf)}
        _daemon(hosts[0], "nodea", folder, f"/usr/sbin/slurmctld -i -f {conf}", env)
        pidfiles.append(folder / "slurmctld.pid")
        for host, node in zip(hosts, NODES):
            _daemon(host, node, folder, f"/usr/sbin/slurmd -N {node} -f {conf}", env)
            pidfiles.append(folder / f"slurmd-{node}.pid")
        cluster = TwoNodeCluster(folder, hosts, env)
        deadline = time.monotonic() + 30
        while cluster.run(["sinfo", "-h", "-N", "-o", "%T"]).stdout.split() != ["idle", "idle"]:
            if time.monotonic() > deadline:
                logs = "\n".join(p.read_text()[-1500:] for p in sorted((folder / "log").glob("*.log")))
                raise RuntimeError(f"the two SLURM nodes are not idle after 30 s:\n{logs}")
            time.sleep(0.3)
        yield cluster
    finally:
        for pidfile in reversed(pidfiles):
            _stop(pidfile)
        shutil.rmtree(munge, ignore_errors=True)
        shutil.rmtree(spool, ignore_errors=True)


def _slurm_conf(folder: Path, spool: Path, socket: Path, hosts: tuple[Host, Host]) -> str:
    nodes = "".join(f"NodeName={node} NodeAddr={host.address} NodeHostname={node} CPUs=1 State=UNKNOWN\n"
                    for host, node in zip(hosts, NODES))
    return f"""# Written by tests/netns_slurm.py: two nodes in two network namespaces.
ClusterName=netns
SlurmctldHost=nodea({hosts[0].address})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket},cred_expire=10
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
InactiveLimit=0
StateSaveLocation={folder}/state
SlurmdSpoolDir={spool}/%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd-%n.log
{nodes}PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


def _daemon(host: Host, node: str, folder: Path, command: str, env: dict[str, str]) -> None:
    """Start a daemon (it daemonizes) in ``host``'s network namespace, named ``node``, with our hosts file."""
    script = f"hostname {node} && mount --bind {folder / 'hosts'} /etc/hosts && exec {command}"
    _check(["nsenter", f"--net=/run/netns/{host.namespace}", "unshare", "--uts", "--mount", "sh", "-c", script],
           env={**os.environ, **env})


def _stop(pidfile: Path, wait_s: float = 10) -> None:
    try:
        pid = int(pidfile.read_text())
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if not _running(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphaned daemon's zombie may wait long for its reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _check(argv: list[str], env: dict[str, str] | None = None) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")


def _install() -> None:
    """slurm-wlm and munge from apt when missing, without starting their services."""
    if shutil.which("slurmctld") and shutil.which("munged") and shutil.which("nsenter"):
        return
    policy = Path("/usr/sbin/policy-rc.d")
    made = not policy.exists()
    if made:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        ok = subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env).returncode == 0 and \
            subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"],
                           capture_output=True, env=env).returncode == 0
    finally:
        if made:
            policy.unlink()
    if not ok:
        raise ClusterUnavailable("slurm-wlm/munge are not installed and apt-get could not install them")
