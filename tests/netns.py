"""Simulated hosts for multi-host tests: Linux network namespaces joined by one veth pair.

Each host is a namespace with its loopback up and one address on a private /24; traffic between
them never leaves the namespaces made here (they have no other interface and no route out). The
processes started on a host, and anything else found in its namespace, are killed by PID, and the
namespaces are deleted by name (which removes the veth pair), pass or fail.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


class HostsUnavailable(Exception):
    """Namespaces cannot be made here (not root, no iproute2, or no permission): the reason."""


@dataclass
class Host:
    """One simulated machine: a network namespace with an address on the veth ``interface``."""

    namespace: str
    interface: str
    address: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    def popen(self, argv: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
        """Start ``argv`` inside this host, its output in ``log``, in a session of its own."""
        with log.open("w") as out:
            process = subprocess.Popen(["ip", "netns", "exec", self.namespace, *argv], cwd=cwd, env=env,
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        return process

    def pids(self) -> list[int]:
        """Every process inside this host's namespace."""
        result = subprocess.run(["ip", "netns", "pids", self.namespace], capture_output=True, text=True)
        return [int(pid) for pid in result.stdout.split()]

    def exists(self) -> bool:
        listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return self.namespace in [line.split()[0] for line in listing.splitlines() if line.strip()]


@contextmanager
def two_hosts(subnet: str = "10.231.7") -> Iterator[tuple[Host, Host]]:
    """Two hosts, ``<subnet>.1`` and ``<subnet>.2``, joined by a veth pair; torn down on exit."""
    problem = _why_unavailable()
    if problem:
        raise HostsUnavailable(problem)
    tag = secrets.token_hex(3)  # unique names: other test runs may make namespaces at the same time
    # The veth ends get the same name in both namespaces, like the same NIC name on every node of a
    # cluster: one GLOO_SOCKET_IFNAME fits every host (what a job script exporting it needs).
    hosts = (Host(f"lp{tag}a", f"lp{tag}", f"{subnet}.1"), Host(f"lp{tag}b", f"lp{tag}", f"{subnet}.2"))
    made: list[str] = []
    try:
        for host in hosts:
            _ip("netns", "add", host.namespace)
            made.append(host.namespace)
            _ip("-n", host.namespace, "link", "set", "lo", "up")
        a, b = hosts
        _ip("link", "add", a.interface, "netns", a.namespace, "type", "veth", "peer", "name", b.interface,
            "netns", b.namespace)
        for host in hosts:
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.interface)
            _ip("-n", host.namespace, "link", "set", host.interface, "up")
        yield hosts
    finally:
        for host in hosts:
            _kill(host)
        for namespace in made:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def _kill(host: Host) -> None:
    """SIGKILL what was started on ``host`` (by session) and whatever still runs in its namespace."""
    for process in host.processes:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if not host.exists():
        return
    for _ in range(50):
        pids = host.pids()
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    for process in host.processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise HostsUnavailable(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")


def _why_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None
