# Source me: the venv, the ament index inside it, single-threaded BLAS (see BENCHMARKS.md).
_here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$_here/.venv/bin/activate"
export AMENT_PREFIX_PATH="$VIRTUAL_ENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
export RMW_IMPLEMENTATION=${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}
unset _here
