#!/usr/bin/env bash
# One GPU check, written into a bundle by `cargo xtask device-bundle --out DIR` (this is its
# template: xtask/device/run.sh). On a Linux machine with an NVIDIA driver and Python with
# PyTorch and transformers (no Rust), in at most 8 minutes (--quick: about 4):
#   1. the CUDA tests (bin/cuda_tests: every tests/tests/*.rs file),
#   2. `xtask bench --backend cuda --json` (matmul, attention, other kernels: three runs),
#   3. our stories110m training step (B 8 × T 1024, bf16) with `xtask train`, and (full mode)
#      a 2-rank data-parallel run over NCCL on this one GPU (NCCL_MULTI_RANK_GPU_ENABLE=1,
#      NCCL ≥ 2.30; an older NCCL fails this phase only),
#   4. PyTorch on the same shapes (python/device_check.py): torch.matmul per GEMM, SDPA per
#      attention shape, a Hugging Face LlamaForCausalLM step eager and torch.compile,
# then RESULTS/report.json and RESULTS/report.md with side-by-side ratios. A phase that fails or
# runs out of time is reported and the next one runs; exit 0 when the report was written.
# The matmuls run the routines of tuning/matmul/'s table for this GPU, if the bundle has one.
#
# --tune instead times every matmul routine on Llama-2-7B's training-step GEMMs at 16k tokens
# (`xtask tune-matmul`: bf16, f16, f32 on TF32) and writes the table of the fastest into
# tuning/matmul/ and RESULTS/tuning/: commit it to the repository, and later runs use it.
#
# usage: ./run.sh [--quick|--full|--tune] [--out RESULTS_DIR]   (default RESULTS_DIR: ./results)
set -uo pipefail

QUICK_DEFAULT=0
HERE="$(cd "$(dirname "$0")" && pwd)"
QUICK=$QUICK_DEFAULT
TUNE=0
OUT="$HERE/results"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --full) QUICK=0 ;;
    --tune) TUNE=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (use --quick, --full, --tune, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
START=$(date +%s)
# Seconds per phase: tests, matmul bench, attention bench, other kernels' bench, our training,
# PyTorch, data parallel. Full: 450 s in all, quick: 230 s, leaving room for start-up and the
# report. The bench runs in three parts so that one running out of time loses only its own rows.
if [ "$QUICK" = 1 ]; then BUDGET=(45 30 45 0 40 70 0); else BUDGET=(90 45 75 35 55 110 40); fi
# CUBELLAMA_CHECK_BUDGETS="T M A K R P D" overrides them (seconds; for testing this script).
[ -n "${CUBELLAMA_CHECK_BUDGETS:-}" ] && read -r -a BUDGET <<< "$CUBELLAMA_CHECK_BUDGETS"
log() { echo "[run.sh $(( $(date +%s) - START ))s] $*" >&2; }
PHASES="$OUT/phases.txt"
: > "$PHASES"
phase_done() { echo "$1 $2 $3" >> "$PHASES"; }   # name, exit status, seconds

# --- Requirements: a GPU, NVRTC, Python ------------------------------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "run.sh: nvidia-smi not found: this check needs a Linux machine with an NVIDIA GPU and its driver" >&2
  exit 3
fi
if ! nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
  echo "run.sh: nvidia-smi lists no GPU (driver not loaded, or no device visible: CUDA_VISIBLE_DEVICES?)" >&2
  nvidia-smi -L >&2 || true
  exit 3
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
log "GPU: $(head -1 "$OUT/gpu.txt")"
PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "run.sh: $PY not found; the PyTorch baselines and the report need Python 3 (set PYTHON=...)" >&2
  exit 3
fi
# NVRTC: CubeCL compiles kernels at run time. PyTorch's CUDA wheels ship libnvrtc.so.12
# (nvidia-cuda-nvrtc-cu12); a CUDA toolkit's lib64 works too.
find_nvrtc() {
  for d in ${LD_LIBRARY_PATH//:/ } "${CUDA_PATH:-/nonexistent}/lib64" /usr/local/cuda/lib64; do
    ls "$d"/libnvrtc.so* >/dev/null 2>&1 && { echo "$d"; return; }
  done
  "$PY" - <<'EOF' 2>/dev/null
import glob, os
try:
    import nvidia.cuda_nvrtc as m
    base = list(m.__path__)[0]
    if glob.glob(os.path.join(base, "lib", "libnvrtc.so*")):
        print(os.path.join(base, "lib"))
except Exception:
    pass
EOF
}
NVRTC_DIR="$(find_nvrtc | head -1)"
if [ -z "$NVRTC_DIR" ]; then
  echo "run.sh: libnvrtc.so not found (LD_LIBRARY_PATH, \$CUDA_PATH/lib64, /usr/local/cuda/lib64, or the" >&2
  echo "        nvidia-cuda-nvrtc-cu12 package PyTorch installs): pip install nvidia-cuda-nvrtc-cu12" >&2
  exit 3
fi
export LD_LIBRARY_PATH="$NVRTC_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CUDA_PATH="$HERE/cuda"            # the headers NVRTC includes (bundled)
export CUBELLAMA_BACKEND=cuda
export CUBELLAMA_FIXTURES="$HERE/fixtures"
export CUBELLAMA_NO_INSTALL=1
log "NVRTC from $NVRTC_DIR"

# Peak device memory of our processes: nvidia-smi sampled every 200 ms while they run.
sample_memory() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$1" 2>/dev/null & echo $!; }

run_phase() {  # name, budget seconds, output file, command...
  local name="$1" budget="$2" output="$3"; shift 3
  local t0; t0=$(date +%s)
  log "$name (≤ ${budget}s)…"
  timeout --signal=TERM --kill-after=10 "$budget" "$@" > "$output" 2> "$OUT/$name.log"
  local rc=$?
  [ $rc = 124 ] && log "$name: out of time after ${budget}s (reported as timeout)"
  [ $rc != 0 ] && [ $rc != 124 ] && log "$name: exit status $rc (see $OUT/$name.log)"
  phase_done "$name" "$rc" "$(( $(date +%s) - t0 ))"
}

# --- Tuning mode: the matmul table only ----------------------------------------------------
if [ "$TUNE" = 1 ]; then
  # 7 minutes, then whatever dtypes finished are in the table (it is written per dtype run).
  for dtype in bf16 f16; do
    ( cd "$HERE" && timeout 200 "$HERE/bin/xtask" tune-matmul --backend cuda --dtype "$dtype" ) \
      > "$OUT/tune_$dtype.txt" 2> "$OUT/tune_$dtype.log"
    log "tune $dtype: exit status $? (see $OUT/tune_$dtype.txt)"
  done
  ( cd "$HERE" && timeout 100 "$HERE/bin/xtask" tune-matmul --backend cuda --dtype f32 --tf32 --iters 3 ) \
    > "$OUT/tune_tf32.txt" 2> "$OUT/tune_tf32.log"
  log "tune tf32: exit status $?"
  mkdir -p "$OUT/tuning" && cp -r "$HERE/tuning/matmul" "$OUT/tuning/"
  cat "$OUT"/tune_*.txt
  log "tables: $OUT/tuning/matmul/ (commit to the repository's tuning/matmul/)"
  exit 0
fi

# --- 1. CUDA tests ------------------------------------------------------------------------
run_phase tests "${BUDGET[0]}" "$OUT/tests.txt" "$HERE/bin/cuda_tests" --test-threads=4

# --- 2. Kernel benchmarks (bench_*.json, merged by device_check.py) -----------------------
if [ "$QUICK" = 1 ]; then ITERS=3; else ITERS=5; fi
bench() {  # part, budget, kernels
  [ "$2" -gt 0 ] || return 0
  run_phase "bench_$1" "$2" "$OUT/bench_$1.json" "$HERE/bin/xtask" bench --backend cuda --json --iters "$ITERS" --kernels "$3"
}
bench matmul "${BUDGET[1]}" matmul
bench attention "${BUDGET[2]}" attention
bench kernels "${BUDGET[3]}" rmsnorm,swiglu,rope,embedding,cross_entropy,adamw,grad_norm

# --- 3. Our stories110m training step -----------------------------------------------------
# The trainer reads its figures every --log-every steps (the GPU does not wait for the host in
# between); each read interval's steps share one time, the first one's including compilation.
if [ "$QUICK" = 1 ]; then STEPS=8; EVERY=2; else STEPS=30; EVERY=5; fi
SAMPLER=$(sample_memory "$OUT/train_memory.txt")
run_phase train "${BUDGET[4]}" "$OUT/train.txt" "$HERE/bin/xtask" train --backend cuda \
  --preset stories110m --vocab-size 32000 --batch 8 --seq-len 1024 --steps "$STEPS" --dtype bf16 \
  --log-every "$EVERY" --out "$OUT/train-run" --log "$OUT/train.jsonl"
kill "$SAMPLER" 2>/dev/null

# Two ranks over NCCL on this GPU, ZeRO-1 (the launcher finds the nvidia-nccl wheel's
# libnccl.so.2 that PyTorch installs). NOT YET RUN on any GPU: this phase is its first check.
if [ "${BUDGET[6]:-0}" -gt 0 ]; then
  NCCL_MULTI_RANK_GPU_ENABLE=1 run_phase data_parallel "${BUDGET[6]}" "$OUT/data_parallel.txt" \
    "$HERE/bin/xtask" train --backend cuda --nproc-per-node 2 --zero 1 --steps 10 --log-every 5 \
    --dist-timeout 30 --out "$OUT/dp-run" --log "$OUT/data_parallel.jsonl"
fi

# --- 4. PyTorch baselines and the report --------------------------------------------------
# The script watches its own budget (15 s short of the phase's) and writes what it has.
PY_ARGS=(--results "$OUT" --budget "$(( BUDGET[5] > 30 ? BUDGET[5] - 15 : BUDGET[5] / 2 ))")
[ "$QUICK" = 1 ] && PY_ARGS+=(--quick)
run_phase pytorch "${BUDGET[5]}" "$OUT/pytorch.txt" "$PY" "$HERE/python/device_check.py" "${PY_ARGS[@]}"
if [ ! -s "$OUT/report.md" ]; then
  # The script failed before writing (no PyTorch at all, say): write the report without it.
  "$PY" "$HERE/python/device_check.py" --results "$OUT" --report-only >> "$OUT/pytorch.log" 2>&1
fi
log "done in $(( $(date +%s) - START ))s: $OUT/report.md"
cat "$OUT/report.md" 2>/dev/null || { echo "run.sh: no report written (see $OUT/*.log)" >&2; exit 1; }
