#!/usr/bin/env bash
# Install (idempotent), lint, and run the test suite (pytest settings and markers: pyproject.toml).
# Arguments go to pytest, e.g. `scripts/test.sh -m "not ros"` (the ROS-free suite) or `-m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. scripts/env.sh
ruff check .
exec python -m pytest -q "$@"
