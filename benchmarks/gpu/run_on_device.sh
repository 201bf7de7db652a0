#!/usr/bin/env bash
# Run on the GPU machine from the repository root, with .whl/ carried (benchmarks/gpu/fetch_wheels.sh):
# installs the carried wheels into /tmp/site and runs the device check (`run_on_device.sh [ARGS]`) or the
# shapes-world training run (`run_on_device.sh shapes [ARGS]`) or a sweep of its variants side by side
# (`run_on_device.sh sweep [ARGS]`); results land in $OUT (or ./out).
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, peft, diffusers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'diffusers', diffusers.__version__)"
script=benchmarks/gpu/device_check.py
if [ "${1:-}" = shapes ]; then
    script=benchmarks/gpu/shapes_on_device.py
    shift
elif [ "${1:-}" = sweep ]; then
    script=benchmarks/gpu/shapes_sweep.py
    shift
fi
python3 "$script" --device cuda --out "${OUT:-out}" "$@"
