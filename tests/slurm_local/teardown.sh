#!/bin/bash
# Stop the single-node cluster started by setup.sh, by the PIDs in its pidfiles (never by name):
# SIGTERM, up to 10 s to exit, then SIGKILL. Safe to run twice or after a partial setup.
for f in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
  [ -s "$f" ] || continue
  p=$(cat "$f")
  if kill -0 "$p" 2>/dev/null; then
    kill "$p"
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$p" 2>/dev/null; then echo "teardown.sh: SIGKILL $p ($f)"; kill -9 "$p"; fi
  fi
  rm -f "$f"
done
exit 0
