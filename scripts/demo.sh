#!/usr/bin/env bash
# Install (idempotent) and run the main job: the double-integrator graph with the SCPO
# safety node and a malicious expert over real DDS, a bag recorded, a summary printed.
# Extra arguments go to `scpo-ros demo` (e.g. --duration 60 --bag runs/my_demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. scripts/env.sh
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-42}
stamp=$(date +%Y%m%d-%H%M%S)
exec scpo-ros demo --duration 30 --bag "runs/demo-$stamp" "$@"
