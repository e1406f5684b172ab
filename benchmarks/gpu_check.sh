#!/usr/bin/env bash
# One prepared GPU check (under 8 minutes on one H100): end to end vs each greedy stage on its cache,
# ImageNet-shaped (224 px, J=8, width 128), AMP bf16 + channels_last. Installs nothing.
#   bash benchmarks/gpu_check.sh OUT_DIR [--tiny] [extra gpu_bench.py flags]
set -euo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR [--tiny]}
shift
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
[ -x "$here/../.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && py="$here/../.venv/bin/python"
missing=()
for mod in torch torchvision numpy; do
  "$py" -c "import $mod" 2>/dev/null || { echo "gpu_check: required module '$mod' is missing" >&2; exit 1; }
done
for mod in zarr numcodecs nvidia.dali; do
  "$py" -c "import $mod" 2>/dev/null || missing+=("$mod")
done
[ ${#missing[@]} -gt 0 ] && echo "gpu_check: optional modules missing: ${missing[*]} (stage inputs then come from device memory, not a cache)"
"$py" -c "import torch; print('gpu_check: torch', torch.__version__, '| cuda', torch.cuda.is_available(), '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
mkdir -p "$out"
PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}" "$py" "$here/gpu_bench.py" "$out" "$@" 2>&1 | tee "$out/log.txt"
