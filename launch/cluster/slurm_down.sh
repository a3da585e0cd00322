#!/usr/bin/env bash
# Stop the development cluster of slurm_up.sh (slurmd -N node1/node2, slurmctld, munged) and clean
# its state (jobs, spool, logs). Harmless when nothing runs. Packages, /etc/hosts entries, the munge
# key and /etc/slurm/slurm.conf are left in place.
set -uo pipefail
STATE=/var/lib/slurm-dev
LOGS=/var/log/slurm-dev
say() { echo "slurm_down: $*"; }

stop() {  # pidfile name
  local pidfile=$1 name=$2
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    local pid; pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    say "stopped $name (pid $pid)"
  fi
}
command -v scancel >/dev/null && scancel --full --quiet -u root 2>/dev/null || true
for pidfile in "$STATE"/slurmd-*.pid; do
  [ -e "$pidfile" ] || continue
  n=${pidfile##*/slurmd-}; stop "$pidfile" "slurmd -N ${n%.pid}"
done
stop "$STATE/slurmctld.pid" slurmctld
if [ -f /run/munge/munged.pid ]; then stop /run/munge/munged.pid munged; fi
rm -rf "$STATE" "$LOGS"
say "state cleaned ($STATE, $LOGS)"
