#!/usr/bin/env bash
# One prepared GPU check (under 8 minutes on one H100): end to end vs each greedy stage on its cache,
# ImageNet-shaped (224 px, J=8, width 128), AMP bf16 + channels_last. Installs nothing. It runs
# benchmarks/gpu_bench.py (whose docstring says what it measures), which saves OUT_DIR/results.json,
# memory.png and throughput.png; everything printed also goes to OUT_DIR/log.txt.
#   bash benchmarks/gpu_check.sh OUT_DIR [--tiny] [extra gpu_bench.py flags]
set -euo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR [--tiny]}
shift
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
[ -x "$here/../.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && py="$here/../.venv/bin/python"
# which modules are there, without importing them (an import of torch takes seconds); gpu_bench.py prints
# torch's version and the device it found
"$py" - <<'PY'
import importlib.util, sys

def present(mod):
    try:
        return importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False

for mod in ("torch", "torchvision", "numpy"):
    if not present(mod):
        sys.exit(f"gpu_check: required module '{mod}' is missing")
missing = [m for m in ("zarr", "numcodecs", "nvidia.dali") if not present(m)]
if missing:
    print(f"gpu_check: optional modules missing: {' '.join(missing)} (stage inputs then come from device memory, "
          "not a cache)")
PY
mkdir -p "$out"
PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}" "$py" "$here/gpu_bench.py" "$out" "$@" 2>&1 | tee "$out/log.txt"
