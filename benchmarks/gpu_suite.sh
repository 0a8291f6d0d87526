#!/usr/bin/env bash
# The GPU benchmark suite in one command, sized for a short slot on one H100/H200: under 6
# minutes (SUITE_BUDGET_S, default 345 s, caps the sum of the steps' limits), most important
# figures first, every step under its own time limit, every CSV row appended as soon as its case
# is measured and every log line flushed, so that a run cut short still leaves numbers.
#
#   bash benchmarks/gpu_suite.sh [--cpu] [--out DIR] [--wheels DIR]
#
# On a GPU machine without network, through the device tool, from the repository root:
#   1. here (PyPI reachable), once:      bash benchmarks/fetch_wheels.sh      (-> wheels/, ~15 MB)
#   2. run(command="SCVI_FAST_GIT_SHA=<git rev-parse --short HEAD> bash benchmarks/gpu_suite.sh
#          --wheels wheels --out $OUT/suite", carry=["wheels"], timeout_s=420)
#      `wheels` is git-ignored, so it must be named in carry. The copy of the checkout there has
#      no .git: SCVI_FAST_GIT_SHA stamps the rows with the sha (fill it in here).
#   3. the files of $OUT/suite come back (at most 8: suite.log, the CSVs, profile_cuda.txt);
#      append their rows to benchmarks/results/<name>.csv to keep them.
#
# Steps and their limits on the GPU (expected durations in brackets; the suite stops starting
# steps once the budget is spent):
#   setup          wheels into /tmp/site (on PYTHONPATH), `import anndata, scvi` checked  [15 s]
#   kernels_check  gpu_check_kernels.py: every Triton kernel against the references    90 s [45 s]
#   step_check     gpu_check_step.py: the CUDA-graph training step against the eager one,
#                  40k cells at the Census preset, ms per step of each mode             60 s [30 s]
#   data           synthetic store 200k cells x 8000 genes, 128 batches, 10% non-zeros,
#                  then its .h5ad (for scvi-tools and the in-memory cases)               45 s [15 s]
#   train          bench_train.py, Census preset, 3 epochs (the first a warm-up): scvi_fast
#                  fp32 / TF32 / bf16-mixed from the store, then scvi-tools fp32        150 s [90 s]
#   embed          bench_census_model.py: the store streamed to .npy at batch 16384 and
#                  1024 (peak RSS), then 20k cells side by side with scvi-tools          50 s [30 s]
#   profile        profile_step.py: per-op GPU time, busy fraction, launches and host
#                  syncs per training step and embedding batch                           45 s [25 s]
#   loader         bench_loader.py on the 200k store, 16 cores (target >= 2M cells/s)    50 s [35 s]
#   kernels_bench  bench_kernels.py at the Census shape                                  60 s [40 s]
#   ddp            bench_ddp.py, only with more than one GPU (budget permitting)          60 s
#
#   --cpu     the same steps at tiny sizes on the CPU (Triton under the interpreter): the end-to-end
#             check on a machine without a GPU (budget 1200 s; rows go to --out only)
#   --out     folder of the log, the CSVs and the profile report (default:
#             benchmarks/results/suite-<date>, or /tmp/scvi_fast_suite/out-<date> with --cpu)
#   --wheels  folder of wheels for packages the machine lacks, installed into /tmp/site first
#   PYTHON        the interpreter (default python3)
#   SCVI_PYTHON   the interpreter that has scvi-tools (default: PYTHON)
#   SUITE_BUDGET_S  seconds for all steps together
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
CPU=0
OUT=""
WHEELS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) CPU=1 ;;
    --out) OUT="$2"; shift ;;
    --wheels) WHEELS="$2"; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
if [ "$CPU" = 1 ]; then
  OUT="${OUT:-/tmp/scvi_fast_suite/out-$STAMP}"
else
  OUT="${OUT:-benchmarks/results/suite-$STAMP}"
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/suite.log"
WORK=/tmp/scvi_fast_suite
mkdir -p "$WORK"
PY="${PYTHON:-python3}"
T_START=$SECONDS
# every benchmark appends its rows to $OUT/<name>.csv (benchmarks/results stays as it is)
export SCVI_FAST_RESULTS="$OUT" PYTHONUNBUFFERED=1
say() { echo "$*" | tee -a "$LOG"; }

say "== setup ($(date -u +%H:%M:%S))"
if [ -n "$WHEELS" ]; then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$WHEELS"/*.whl 2>&1 | tee -a "$LOG"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    say "no wheels in $WHEELS"
  fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
SCVI_PY="${SCVI_PYTHON:-$PY}"
"$PY" - <<'PYEOF' 2>&1 | tee -a "$LOG"
import os, platform, torch
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
      "| cores:", os.cpu_count(), "| python", platform.python_version(), "| torch", torch.__version__,
      "cuda", torch.version.cuda)
PYEOF
if "$SCVI_PY" -c "import anndata, scvi; print('anndata', anndata.__version__, '| scvi-tools', scvi.__version__)" 2>&1 | tail -n 1 | tee -a "$LOG" | grep -q scvi-tools; then
  HAVE_SCVI=1
else
  HAVE_SCVI=0
  say "!! anndata / scvi-tools not importable by $SCVI_PY: scvi-tools comparisons are skipped"
fi
"$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import _common as C; print('git', C.git_sha())" 2>&1 | tee -a "$LOG"

if [ "$CPU" = 1 ]; then
  DEV=cpu; export TRITON_INTERPRET=1
  BUDGET="${SUITE_BUDGET_S:-1200}"
  KERNEL_CHECK=(--cpu)
  KERNELS=(--device cpu --impl native torch --B 64 --G 500 --H 32 --Z 8 --densities 0.1 --repeats 3 --warmup 1)
  CELLS=4000; GENES=500; BATCHES=8; EPOCHS=2
  EMBED=(--batch-sizes 2048,512 --repeats 1); ST_CELLS=1000
  PROFILE=(--n-genes 500 --batch-size 128 --steps-per-epoch 3 --embed-batch-size 256 --batches 2)
  LOADER=(--sizes 20000 --n-genes 500 --repeats 2 --budget 2)
  LIMITS=(kernels_check=120 step_check=60 data=60 train=300 embed=200 profile=150 loader=150 kernels_bench=150)
else
  DEV=cuda
  BUDGET="${SUITE_BUDGET_S:-345}"
  KERNEL_CHECK=()
  KERNELS=(--device cuda --impl triton torch dense --densities 0.1 --repeats 20 --warmup 3)
  CELLS=200000; GENES=8000; BATCHES=128; EPOCHS=3
  EMBED=(--batch-sizes 16384,1024 --repeats 3); ST_CELLS=20000
  PROFILE=()
  LOADER=(--sizes 200000 --repeats 2 --budget 3)
  LIMITS=(kernels_check=90 step_check=60 data=45 train=150 embed=50 profile=45 loader=50 kernels_bench=60 ddp=60)
fi
limit_of() { local kv; for kv in "${LIMITS[@]}"; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}"; done; }
SCVI_ARGS=(--scvi-python "$SCVI_PY")
[ "$HAVE_SCVI" = 1 ] || SCVI_ARGS=(--no-scvi-tools)

FAILED=()
step() {  # step NAME CMD...: runs under min(its limit, what is left of the budget)
  local name="$1"; shift
  local left=$((BUDGET - (SECONDS - T_START)))
  local limit; limit="$(limit_of "$name")"
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    say "!! $name skipped: the suite's budget (${BUDGET} s) is spent"
    FAILED+=("$name(skipped)")
    return
  fi
  say "== $name ($(date -u +%H:%M:%S), limit ${limit} s)"
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then
    say "-- $name done in $((SECONDS - t0)) s"
  else
    say "!! $name failed (exit $rc$([ "$rc" = 124 ] && echo ": time limit")) after $((SECONDS - t0)) s"
    FAILED+=("$name")
  fi
}

step kernels_check "$PY" benchmarks/gpu_check_kernels.py "${KERNEL_CHECK[@]}"
step step_check "$PY" benchmarks/gpu_check_step.py "${KERNEL_CHECK[@]}"
step data "$PY" - "$WORK" "$CELLS" "$GENES" "$BATCHES" "$HAVE_SCVI" <<'PYEOF'
import sys, time
sys.path.insert(0, "benchmarks")
import _common as C
work, cells, genes, batches, have_scvi = sys.argv[1], *map(int, sys.argv[2:])
key = (cells, genes, batches, 0.1)
t0 = time.perf_counter()
C.synthetic_store(C.synthetic_path(work, *key, ".store"), *key)
if have_scvi:
    C.synthetic_h5ad(C.synthetic_path(work, *key, ".h5ad"), *key)
print(f"data ready in {time.perf_counter() - t0:.1f} s")
PYEOF
STORE="$WORK/synthetic_${CELLS}x${GENES}_${BATCHES}b_0.1.store"
step train "$PY" benchmarks/bench_train.py --suite census --device "$DEV" --n-cells "$CELLS" \
  --n-genes "$GENES" --n-batches "$BATCHES" --epochs "$EPOCHS" --repeats 1 --impls auto \
  --sources store --precisions 32,tf32,bf16-mixed "${SCVI_ARGS[@]}" --workdir "$WORK"
if [ "$GENES" = 8000 ]; then EMBED_STORE=(--store "$STORE"); else EMBED_STORE=(--n-cells "$CELLS"); fi
# the side-by-side part needs anndata (and scvi-tools)
[ "$HAVE_SCVI" = 1 ] || ST_CELLS=0
step embed "$PY" benchmarks/bench_census_model.py --device "$DEV" "${EMBED_STORE[@]}" \
  "${EMBED[@]}" --st-cells "$ST_CELLS" --scvi-python "$SCVI_PY" --work "$WORK/census_model"
step profile "$PY" benchmarks/profile_step.py --device "$DEV" "${PROFILE[@]}" --out "$OUT" \
  --workdir "$WORK"
LOADER_SCVI=()
[ "$HAVE_SCVI" = 1 ] && LOADER_SCVI=(--scvi-python "$SCVI_PY")
step loader "$PY" benchmarks/bench_loader.py "${LOADER[@]}" --n-batches "$BATCHES" \
  --cases store store_mmap memory toarray scvi_tools "${LOADER_SCVI[@]}" --workdir "$WORK"
KERNELS_CSV=()
"$PY" benchmarks/bench_kernels.py --help 2>/dev/null | grep -q -- "--csv" && KERNELS_CSV=(--csv "$OUT/kernels.csv")
step kernels_bench "$PY" benchmarks/bench_kernels.py "${KERNELS[@]}" "${KERNELS_CSV[@]}"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$CPU" = 0 ] && [ "$NGPU" -gt 1 ]; then
  step ddp "$PY" benchmarks/bench_ddp.py --device cuda
fi

say "== done in $((SECONDS - T_START)) s; results in $OUT:"
ls "$OUT" | tee -a "$LOG"
if [ ${#FAILED[@]} -gt 0 ]; then
  say "failed or skipped steps: ${FAILED[*]}"
  exit 1
fi
