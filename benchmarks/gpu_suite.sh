#!/usr/bin/env bash
# The GPU benchmark suite in one command: Triton kernel correctness and speed, loader, training
# and embedding (side by side with scvi-tools when it is importable), and DDP scaling when more
# than one GPU is present. Every CSV row and log lands in one folder; the whole suite is sized to
# finish in under 8 minutes on one H100/H200.
#
#   bash benchmarks/gpu_suite.sh [--cpu] [--out DIR] [--wheels DIR]
#
#   --cpu     run the same steps on the CPU at tiny sizes (Triton under the interpreter): the
#             check that the suite works end to end on a machine without a GPU; its rows go to
#             the --out folder only, benchmarks/results is left as it was
#   PYTHON    environment variable: the interpreter to use (default python3)
#   --out     folder for the logs and CSV copies (default: benchmarks/results/suite-<date>)
#   --wheels  folder of wheels for packages the GPU machine lacks (e.g. anndata, safetensors,
#             tqdm, ninja, scvi-tools and its dependencies); installed into /tmp/site first
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
OUT="${OUT:-benchmarks/results/suite-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
# A --cpu check must not leave rows in the recorded results: keep the CSVs as they were.
KEEP=""
if [ "$CPU" = 1 ]; then
  KEEP="$(mktemp -d)"; cp benchmarks/results/*.csv "$KEEP"/ 2>/dev/null
fi
if [ -n "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SCVI_PY="$PY"
"$PY" -c "import scvi" 2>/dev/null || echo "scvi-tools is not importable: its rows are skipped" | tee "$OUT/notes.txt"

if [ "$CPU" = 1 ]; then
  DEV=cpu; export TRITON_INTERPRET=1
  KERNEL_CHECK=(--cpu)
  KERNELS=(--device cpu --impl native torch --B 64 --G 500 --H 32 --Z 8 --densities 0.1 --repeats 3 --warmup 1)
  LOADER=(--sizes 20000 --n-genes 500 --repeats 1 --budget 5 --cases store memory toarray)
  CELLS=2000; GENES=500; BATCHES=8; EPOCHS=2; EMBED_REPEATS=1
else
  DEV=cuda
  KERNEL_CHECK=()
  KERNELS=(--device cuda --impl triton torch dense --repeats 20 --warmup 3)
  LOADER=(--sizes 200000 2000000 --repeats 3 --budget 10 --cases store memory toarray)
  CELLS=200000; GENES=8000; BATCHES=128; EPOCHS=3; EMBED_REPEATS=3
fi
"$PY" - <<PYEOF | tee "$OUT/device.txt"
import torch, platform
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu")
print("torch", torch.__version__, "cuda", torch.version.cuda)
PYEOF

FAILED=()
step() {  # step NAME TIMEOUT_S CMD...
  local name="$1" limit="$2"; shift 2
  echo "== $name ($(date -u +%H:%M:%S))" | tee -a "$OUT/suite.log"
  if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    tail -n 25 "$OUT/$name.log" | tee -a "$OUT/suite.log"
  else
    echo "!! $name failed or timed out (see $name.log)" | tee -a "$OUT/suite.log"
    tail -n 25 "$OUT/$name.log" | tee -a "$OUT/suite.log"
    FAILED+=("$name")
  fi
}

step kernels_check 90 "$PY" benchmarks/gpu_check_kernels.py "${KERNEL_CHECK[@]}"
step kernels_bench 120 "$PY" benchmarks/bench_kernels.py "${KERNELS[@]}"
step loader 150 "$PY" benchmarks/bench_loader.py "${LOADER[@]}" --workdir /tmp/scvi_fast_suite
step train 240 "$PY" benchmarks/bench_train.py --suite census --device "$DEV" --n-cells "$CELLS" \
  --n-genes "$GENES" --n-batches "$BATCHES" --epochs "$EPOCHS" --repeats 1 --impls auto,torch \
  --sources store,memory --scvi-python "$SCVI_PY" --workdir /tmp/scvi_fast_suite
step embed 150 "$PY" benchmarks/bench_embed.py --device "$DEV" --n-cells "$CELLS" --n-genes "$GENES" \
  --n-batches "$BATCHES" --repeats "$EMBED_REPEATS" --impls auto --sources store,memory \
  --scvi-python "$SCVI_PY" --workdir /tmp/scvi_fast_suite
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$CPU" = 0 ] && [ "$NGPU" -gt 1 ]; then
  step ddp 120 "$PY" benchmarks/bench_ddp.py --device cuda
fi
cp benchmarks/results/*.csv "$OUT"/ 2>/dev/null
if [ -n "$KEEP" ]; then
  rm -f benchmarks/results/*.csv; cp "$KEEP"/*.csv benchmarks/results/ 2>/dev/null; rm -rf "$KEEP"
fi
echo "results in $OUT" | tee -a "$OUT/suite.log"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "failed steps: ${FAILED[*]}" | tee -a "$OUT/suite.log"
  exit 1
fi
