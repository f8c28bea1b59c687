#!/usr/bin/env bash
# Stop the one-node SLURM cluster started by up.sh: every daemon by the pid
# recorded in the state dir (TERM, then KILL after a grace period).  The state
# dir (configs, accounting database, logs) is kept; pass --purge to delete it.
set -uo pipefail

STATE="${TELEPATHY_SLURM_DIR:-/tmp/telepathy-slurm}"
[ -d "$STATE/run" ] || exit 0

# slurmd first so that running jobs are not orphaned with a live controller
for d in slurmd slurmctld slurmdbd mariadb munged; do
  f="$STATE/run/$d.pid"
  [ -s "$f" ] || continue
  pid="$(cat "$f")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    echo "[slurm-down] stopped $d ($pid)" >&2
  fi
  rm -f "$f"
done

if [ "${1:-}" = "--purge" ]; then
  rm -rf "$STATE"
  echo "[slurm-down] removed $STATE" >&2
fi
