#!/usr/bin/env bash
# The prepared script for a lent GPU machine (16 CPU cores, one H100/H200, no network).
# Its image has torch, transformers and huggingface_hub but not Ray or diffusers: those travel as wheels in .whl/
# (Ray without its Java jars, to fit the 64 MiB limit). Writes everything under $OUT (default /tmp/device_out).
#   bash benchmarks/device_check.sh [perf] [gpu] [scaling] [boundary] [ab]   (perf when none is named)
#   perf:    every GPU measurement of issue 15 in one run, under 8 minutes (each step has its own timeout):
#            benchmarks/gpu_bench.py: MFU per rows a call (2..32) in float16 and bfloat16, SDPA kernel, and the memory
#            estimate against the measured peak; the same with --compile at 16 rows (compile time); equal_work.py on
#            the GPU (sdxl-random 2048x2048, 10 steps); 4096x4096 APT end to end at the defaults on one GPU.
#   gpu:     benchmarks/gpu_check.py: sdxl-random 2048x2048 in-process (apt, demofusion) and on one Ray worker;
#            benchmarks/bench.py overhead.
#   scaling: benchmarks/bench.py scaling at WORKERS (default 4,8,16) on 16 cores instead of this repo's usual 2, the driver
#            on each of DRIVER_THREADS (default: "default 4", torch's own count and 4), REPEATS times each (default 1;
#            repeats go to *_r2, *_r3 ...); the per-step timeline at each of TIMELINE_WORKERS (default "8 16"), driver on
#            TIMELINE_THREADS (default torch's own).
#   boundary: benchmarks/step_boundary.py (the driver's work between a step's last reply and the next step's first
#            call, no Ray) at 16 workers, driver on TIMELINE_THREADS (default 4).
#   ab:      the tree against an older package copied into AB_BASE (default ab_base; carry it), side by side:
#            benchmarks/checkout_ab.py at AB_WORKERS (default 16), AB_ROUNDS (default 3) x AB_RENDERS (default 2)
#            renders, driver on TIMELINE_THREADS (default 4); step_boundary.py for each, alternating, REPEATS (default 3)
#            times; the per-step timeline of the tree at 16 workers when TIMELINE=1. Each checkout_ab process takes
#            about 45 s plus 11 s a render at 16 workers: 3 rounds x 2 renders ran about 5.5 min (AB_TIMEOUT, default
#            420 s), 2 rounds x 3 renders outran 240 s.
set -uo pipefail
OUT=${OUT:-/tmp/device_out}
PARTS=${*:-perf}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; python3 --version;
  python3 -c "import torch, diffusers, ray, transformers; print(torch.__version__, diffusers.__version__, ray.__version__, transformers.__version__)"; } 2>&1 | tee "$OUT/machine.txt"
if [[ " $PARTS " == *" perf "* ]]; then  # worst case, every step at its timeout: 100 + 100 + 90 + 180 s = 7.8 min
  timeout 100 python3 benchmarks/gpu_bench.py --rows 2,4,8,16,32 --dtypes float16,bfloat16 --memory --seconds 1 \
    --markdown "$OUT/gpu_bench.md" --json "$OUT/gpu_bench.json" 2>&1 | grep -v '^\[transformers\]' | tee "$OUT/gpu_bench.log" | tail -30
  timeout 100 python3 benchmarks/gpu_bench.py --rows 16 --dtypes float16 --compile on --seconds 1 \
    --markdown "$OUT/gpu_bench_compile.md" 2>&1 | grep -v '^\[transformers\]' | tee "$OUT/gpu_bench_compile.log" | tail -8
  timeout 90 python3 benchmarks/equal_work.py --model sdxl-random --dtype float16 --width 2048 --height 2048 --steps 10 \
    --rounds 1 --markdown "$OUT/equal_work_gpu.md" --json "$OUT/equal_work_gpu.json" 2>&1 | grep -v '^\[transformers\]' | tee "$OUT/equal_work_gpu.log" | tail -8
  start=$SECONDS  # end to end: model build, sampling, decode, PNG
  timeout 180 python3 -m apt_dist render --model sdxl-random --width 4096 --height 4096 --no-progress --out "$OUT/apt_4096.png" 2>&1 \
    | grep -v '^\[transformers\]' | tee "$OUT/apt_4096.log" | tail -3
  echo "apt 4096x4096 end to end: $((SECONDS - start)) s of wall (timeout 180)" | tee -a "$OUT/apt_4096.log"
  python3 -m apt_dist plan --model sdxl-random --width 4096 --height 4096 --gpu-memory 24 > "$OUT/plan_4096_24gib.txt" 2>&1
fi
if [[ " $PARTS " == *" gpu "* ]]; then
  timeout "${GPU_CHECK_TIMEOUT:-330}" python3 benchmarks/gpu_check.py "$OUT" --steps "${STEPS:-50}" 2>&1 | grep -v '^\[transformers\]' | tee "$OUT/gpu_check.log"
  timeout 90 python3 benchmarks/bench.py overhead --json "$OUT/overhead_16cpu.json" --markdown "$OUT/overhead_16cpu.md" 2>&1 | tail -20
fi
if [[ " $PARTS " == *" scaling "* ]]; then
  for t in ${DRIVER_THREADS:-default 4}; do  # the driver's torch threads: torch's default (one per core), or t
    opt=(); sfx=""
    [[ $t != default ]] && opt=(--driver-threads "$t") && sfx="_driver$t"
    for r in $(seq 1 "${REPEATS:-1}"); do
      rs=""; [[ $r != 1 ]] && rs="_r$r"
      timeout 170 python3 benchmarks/bench.py scaling --workers "${WORKERS:-4,8,16}" "${opt[@]}" \
        --json "$OUT/scaling_16cpu$sfx$rs.json" --markdown "$OUT/scaling_16cpu$sfx$rs.md" 2>&1 | tail -12
    done
  done
  for n in ${TIMELINE_WORKERS:-8 16}; do
    timeout 90 python3 benchmarks/step_timeline.py --workers "$n" ${TIMELINE_THREADS:+--driver-threads $TIMELINE_THREADS} \
      --markdown "$OUT/step_timeline_${n}_16cpu.md" 2>&1 | tail -8
  done
fi
if [[ " $PARTS " == *" boundary "* ]]; then
  timeout 150 python3 benchmarks/step_boundary.py --workers 16 --driver-threads "${TIMELINE_THREADS:-4}" \
    --markdown "$OUT/step_boundary_16_16cpu.md" 2>&1 | tail -8
fi
if [[ " $PARTS " == *" ab "* ]]; then
  base=${AB_BASE:-ab_base}; th=${TIMELINE_THREADS:-4}
  OMP_NUM_THREADS=$th timeout "${AB_TIMEOUT:-420}" python3 benchmarks/checkout_ab.py "$base" . --workers "${AB_WORKERS:-16}" \
    --rounds "${AB_ROUNDS:-3}" --renders "${AB_RENDERS:-2}" --markdown "$OUT/checkout_ab_${AB_WORKERS:-16}_16cpu.md" 2>&1 | tail -8
  for r in $(seq 1 "${REPEATS:-3}"); do
    for pkg in base tree; do  # the package's folder first on the path: it shadows the tree's
      dir=$PWD; [[ $pkg == base ]] && dir=$PWD/$base
      PYTHONPATH=$dir${PYTHONPATH:+:$PYTHONPATH} timeout 60 python3 benchmarks/step_boundary.py --workers 16 \
        --driver-threads "$th" --markdown "$OUT/step_boundary_16_16cpu_${pkg}_r$r.md" 2>&1 | tail -6
    done
  done
  if [[ ${TIMELINE:-0} == 1 ]]; then
    timeout 60 python3 benchmarks/step_timeline.py --workers 16 --driver-threads "$th" --markdown "$OUT/step_timeline_16_16cpu.md" 2>&1 | tail -8
  fi
fi
