#!/bin/bash
# A real single-node SLURM cluster on this machine, for the tests marked `slurm`.
#
# Our copy of the recipe in the shared notes (slurm-local/setup.sh), so that CI on a clean clone
# needs nothing outside the repository. Debian/Ubuntu, run as root, no systemd, no cgroups:
#   - installs slurm-wlm and munge with apt if slurmctld is missing (service autostart blocked),
#   - writes /etc/slurm/slurm.conf: one node `localhost` with NCPUS CPUs, partition `debug`,
#   - starts munged (as user munge), slurmctld and slurmd (each daemonizes, PID in a pidfile),
#   - waits until the node is idle (exit 1 if it never is).
# On any failure it stops whatever it started (teardown.sh), so a failed setup leaves nothing behind.
# Exit codes: 0 up; 1 failed (cleaned up); 3 slurm/munge missing and apt could not install them;
# 4 a SLURM daemon is already running here (left alone).
# Usage: NCPUS=2 tests/slurm_local/setup.sh     Stop with tests/slurm_local/teardown.sh
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
T0=$(date +%s%N)
NCPUS=${NCPUS:-$(nproc)}
IDLE_TIMEOUT_S=${IDLE_TIMEOUT_S:-30}

if [ "$(id -u)" != 0 ]; then echo "setup.sh: must run as root" >&2; exit 1; fi
for f in /run/slurmctld.pid /run/slurmd.pid; do
  if [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; then
    echo "setup.sh: a SLURM daemon is already running (pid $(cat "$f") in $f); not touching it" >&2
    exit 4
  fi
done
trap 'echo "setup.sh: line $LINENO failed: $BASH_COMMAND" >&2' ERR
trap 'rc=$?; if [ $rc != 0 ]; then echo "setup.sh: failed (rc $rc), stopping what was started" >&2; "$HERE/teardown.sh" >&2 || true; fi' EXIT

# 0) packages (skipped if present). A temporary policy-rc.d keeps dpkg from starting the services.
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || { echo "setup.sh: slurm is not installed and there is no apt-get" >&2; exit 3; }
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=1
  fi
  installed=0
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    slurm-wlm munge && installed=1
  if [ $made_policy = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
  [ $installed = 1 ] || { echo "setup.sh: apt-get could not install slurm-wlm and munge" >&2; exit 3; }
fi

# 1) munge: key + runtime dirs, munged runs as user munge
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
chmod 400 /etc/munge/munge.key; chmod 755 /run/munge
runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1   # daemonizes; pid in /run/munge/munged.pid
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null

# 2) slurm config
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
# Written by tests/slurm_local/setup.sh: one node, no accounting, no cgroups.
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# requeued jobs wait cred_expire (default 120 s) before they may start again; shorten for CI
AuthInfo=cred_expire=10
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
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=localhost NodeAddr=127.0.0.1 CPUs=${NCPUS} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF

# 3) daemons (both daemonize; PIDs in the pidfiles above). Their stdio goes to /dev/null so a
#    caller reading our output through a pipe is not held open by them.
/usr/sbin/slurmctld -i </dev/null >/dev/null 2>&1     # -i: ignore/clear saved state
/usr/sbin/slurmd -N localhost </dev/null >/dev/null 2>&1   # NodeName != `hostname`: pass it

# 4) wait for the node to be idle
st=
for _ in $(seq $((IDLE_TIMEOUT_S * 5))); do
  st=$(sinfo -h -N -o %T 2>/dev/null || true)
  [ "$st" = "idle" ] && break
  sleep 0.2
done
if [ "$st" != "idle" ]; then
  echo "setup.sh: node not idle after ${IDLE_TIMEOUT_S} s (state '${st}'); see /var/log/slurm/*.log" >&2
  tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
  exit 1
fi
sinfo
T1=$(date +%s%N)
echo "cluster up in $(( (T1 - T0) / 1000000 )) ms"
