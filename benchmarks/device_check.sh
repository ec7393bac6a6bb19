#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (16 CPU cores, one H100/H200, no network).
# Its image has torch, transformers and huggingface_hub but not Ray or diffusers: those travel as wheels in .whl/
# (Ray without its Java jars, to fit the 64 MiB limit). Writes everything under $OUT (default /tmp/device_out).
#   1. benchmarks/gpu_check.py: sdxl-random 2048x2048 in-process (apt, demofusion) and on one Ray worker.
#   2. apt-dist bench scaling 4,8,16 workers and bench overhead, on 16 cores instead of this repo's usual 2.
set -uo pipefail
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; python3 --version;
  python3 -c "import torch, diffusers, ray, transformers; print(torch.__version__, diffusers.__version__, ray.__version__, transformers.__version__)"; } 2>&1 | tee "$OUT/machine.txt"
timeout "${GPU_CHECK_TIMEOUT:-330}" python3 benchmarks/gpu_check.py "$OUT" --steps "${STEPS:-50}" 2>&1 | grep -v '^\[transformers\]' | tee "$OUT/gpu_check.log"
timeout 150 python3 -m apt_dist bench scaling --workers 4,8,16 --json "$OUT/scaling_16cpu.json" --markdown "$OUT/scaling_16cpu.md" 2>&1 | tail -30
timeout 90 python3 -m apt_dist bench overhead --json "$OUT/overhead_16cpu.json" --markdown "$OUT/overhead_16cpu.md" 2>&1 | tail -20
