#!/bin/bash
# Stop the single-node cluster started by setup.sh by the PIDs in its pidfiles (never by name):
# SIGTERM, up to 10 s to exit, then SIGKILL. A PID is signalled only if it still belongs to the
# daemon its pidfile names (a stale pidfile may hold a reused PID). Safe to run twice or after a
# partial setup; always exits 0.
stop() {  # pidfile, expected process name
  local f=$1 name=$2 p
  [ -s "$f" ] || return 0
  p=$(cat "$f")
  if [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$name" ]; then
    kill "$p" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$p" 2>/dev/null; then echo "teardown.sh: SIGKILL $name ($p)"; kill -9 "$p"; fi
  fi
  rm -f "$f"
}
stop /run/slurmd.pid slurmd
stop /run/slurmctld.pid slurmctld
stop /run/munge/munged.pid munged
exit 0
