#!/usr/bin/env bash
# Build the host et_bench against the executorch pip wheel of a Python.
#   bash android_bench/build_host.sh PY OUTDIR     (e.g. .venv/bin/python build/host)
# Idempotent: reconfigures only when needed, rebuilds only what changed.
# Prints one line on success: the path of the binary.
set -euo pipefail

if [ $# -ne 2 ]; then
  echo "usage: $0 PYTHON OUTDIR   (e.g. $0 .venv/bin/python build/host)" >&2
  exit 2
fi
PY=$1
OUT=$2
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

for tool in cmake g++; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "error: $tool not found: install it (Debian/Ubuntu: sudo apt-get install cmake g++), or run \`make system\`" >&2
    exit 1
  fi
done
if ! "$PY" -c 'import sys' >/dev/null 2>&1; then
  echo "error: python '$PY' does not run (create the venv first: \`make venv\`)" >&2
  exit 1
fi
# Absolute path to the interpreter, keeping a venv's bin/ (no symlink resolution).
case "$PY" in
  /*) PY_ABS=$PY ;;
  */*) PY_ABS="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;;
  *) PY_ABS=$(command -v "$PY") ;;
esac
if ! "$PY_ABS" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("executorch") is None)' 2>/dev/null; then
  echo "error: executorch is not installed for $PY_ABS (pip install executorch==1.4.1)" >&2
  exit 1
fi

GEN=()
if command -v ninja >/dev/null 2>&1 && [ ! -f "$OUT/CMakeCache.txt" ]; then
  GEN=(-G Ninja)
fi
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
# The wheel's executorch-config.cmake runs `python3` from PATH: make it ours.
export PATH="$(dirname "$PY_ABS"):$PATH"
if ! cmake -S "$SRC" -B "$OUT" "${GEN[@]}" -DET_BENCH_MODE=HOST -DCMAKE_BUILD_TYPE=Release \
      -DPython3_EXECUTABLE="$PY_ABS" >"$LOG" 2>&1; then
  cat "$LOG" >&2
  echo "error: cmake configure of android_bench failed (log above)" >&2
  exit 1
fi
if ! cmake --build "$OUT" --target et_bench -j "$(nproc 2>/dev/null || echo 2)" >"$LOG" 2>&1; then
  cat "$LOG" >&2
  echo "error: building et_bench failed (log above)" >&2
  exit 1
fi
if ! "$OUT/et_bench" --help >/dev/null 2>"$LOG"; then
  cat "$LOG" >&2
  echo "error: $OUT/et_bench was built but does not start (log above)" >&2
  exit 1
fi
echo "built $OUT/et_bench"
