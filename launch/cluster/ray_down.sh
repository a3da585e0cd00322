#!/usr/bin/env bash
# Stop the local Ray head started by ray_up.sh. Note: `ray stop` stops every Ray process on this machine.
set -euo pipefail
export RAY_AUTH_MODE=disabled
ray stop --force >/dev/null 2>&1 || true
echo "ray stopped"
