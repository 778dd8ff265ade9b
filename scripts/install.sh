#!/usr/bin/env bash
# Create .venv (Python 3.11) with scpo_ros, the ROS 2 Kilted rclpy wheels and the test tools.
# torch==2.13.0 goes first: it is the CPU wheel; any looser torch requirement would pull CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet ".[ros,test]"
echo "scpo_ros installed in $(pwd)/.venv"
