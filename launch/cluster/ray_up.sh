#!/usr/bin/env bash
# Start a local Ray head for development: 127.0.0.1 only, dashboard (job server) on :8265.
# Idempotent: if a head already answers on the dashboard address, nothing is started.
#
#   launch/cluster/ray_up.sh            # RAY_NUM_CPUS (default: all cores), RAY_DASHBOARD_PORT (8265)
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- python launch/ray_job.py ...
#   launch/cluster/ray_down.sh
#
# Workers inherit this shell's environment (TORCH_EXTENSIONS_DIR, AWS_*, OMP_NUM_THREADS...):
# export what the jobs need before starting the head.
set -euo pipefail

export RAY_AUTH_MODE=disabled          # no ~/.ray/auth_token, no token auth on the local cluster
export RAY_USAGE_STATS_ENABLED=0
PORT="${RAY_DASHBOARD_PORT:-8265}"
CPUS="${RAY_NUM_CPUS:-$(nproc)}"
ADDRESS="http://127.0.0.1:${PORT}"

if ray job list --address "$ADDRESS" >/dev/null 2>&1; then
    echo "ray head already up: $ADDRESS"
    exit 0
fi

ray start --head --node-ip-address 127.0.0.1 --num-cpus "$CPUS" \
    --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$PORT" \
    --disable-usage-stats >/dev/null

for _ in $(seq 1 60); do  # the job server comes up a little after `ray start` returns
    if ray job list --address "$ADDRESS" >/dev/null 2>&1; then
        echo "ray head up: $ADDRESS"
        exit 0
    fi
    sleep 1
done
echo "ray head started but the job server at $ADDRESS did not answer within 60 s" >&2
exit 1
