#!/usr/bin/env bash
# The one script for a GPU machine (an H100/H200 with PyTorch + Triton, nvcc and ninja, no internet); about 8 minutes.
#
#   bash benchmarks/gpu_check.sh OUTDIR                  # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --cpu-dry-run OUTDIR    # the same steps on a CPU with tiny sizes (no build, no GPU tests)
#
# Steps, each under `timeout` and within an overall budget (GPU_CHECK_BUDGET seconds, default 450), each one's exit
# code recorded in OUTDIR/steps.tsv and the summary (124 = timed out); a failed step does not stop the next:
#   env        nvidia-smi -L, python / torch / triton versions, available backends       -> OUTDIR/env.log
#   build      pip install --no-build-isolation --no-deps -e . (fallback: setup.py build_ext --inplace)
#                                                                                         -> OUTDIR/build.log
#   gpu_tests  pytest -m gpu tests/test_cpp_ops.py tests/test_triton.py tests/test_fused_network.py -> OUTDIR/gpu_tests.log, gpu_tests.xml
#   train      bench_train.py at the paper sizes (NYUD 480x640 2 tasks, PASCAL 512x512 5 tasks), batch 8, fp32 and
#              bf16 autocast, reference vs fused, plus the layout rows (--layouts) -> OUTDIR/train.json, train.log
#   ops        bench_ops.py at the paper's per-scale shapes, batch 8 then 1 -> OUTDIR/ops.json, ops.log (the JSON is
#              rewritten after every case, so a timeout keeps what was measured)
#   plot       plot.py: PNGs and OUTDIR/summary.md, printed last
# Environment: PYTHON (default python, else python3), GPU_CHECK_BUDGET, TRAIN_REPEATS (5), OPS_ARGS (extra bench_ops
# arguments, e.g. "--pairs 2,20"), CUDA_HOME (default /usr/local/cuda), MAX_JOBS (build parallelism, default nproc).
set -u
export PYTHONUNBUFFERED=1

DRY=0
if [ "${1:-}" = "--cpu-dry-run" ]; then
    DRY=1
    shift
fi
if [ $# -ne 1 ]; then
    echo "usage: $0 [--cpu-dry-run] OUTDIR" >&2
    exit 2
fi
OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-$([ "$DRY" = 1 ] && echo 900 || echo 450)}  # a shared 2-core CPU is slow
RESERVE=25  # seconds kept for plot + summary
: > "$OUT/steps.tsv"

record() {  # name, exit code, seconds
    printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$OUT/steps.tsv"
    echo "=== step $1: exit $2 after $3 s"
}

# run_step NAME LIMIT_S LOG COMMAND: COMMAND (a bash string) under timeout, output to LOG, its tail on the console
run_step() {
    local name=$1 limit=$2 log=$3 cmd=$4
    local left=$((START + BUDGET - RESERVE - $(date +%s)))
    [ "$name" = plot ] && left=$((left + RESERVE))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        record "$name" "skipped (out of time)" 0
        return
    fi
    echo "=== step $name (limit ${limit} s): $cmd"
    local t0=$(date +%s)
    timeout -k 10 "$limit" bash -c "$cmd" > "$log" 2>&1
    local rc=$?
    tail -n 8 "$log"
    record "$name" "$rc" $(($(date +%s) - t0))
}

run_step env 60 "$OUT/env.log" "
    (nvidia-smi -L || echo 'nvidia-smi: not available') 2>&1
    $PY -c 'import sys, torch; print(\"python\", sys.version.split()[0]); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.is_available() and torch.cuda.get_device_name())'
    $PY -c 'import triton; print(\"triton\", triton.__version__)' || echo 'triton: not importable'
    $PY -c 'import matplotlib; print(\"matplotlib\", matplotlib.__version__)' || echo 'matplotlib: missing (plots will be skipped)'
    nvcc --version 2>/dev/null | tail -n 1; ninja --version 2>/dev/null | sed 's/^/ninja /'"
cat "$OUT/env.log"

if [ "$DRY" = 1 ]; then
    record build skipped 0
    record gpu_tests skipped 0
    TRAIN="--device cpu --configs nyud2,pascal5 --batch 1 --size 64 64 --widths 12 24 48 96 --amp both --layouts --repeats 1"
    OPS="--device cpu --quick --positions-scale 0.25 --min-run-time 0.02"
else
    export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    # the build counts as good when the extension loads with its CUDA kernels
    CHECK_CUDA="$PY -c 'import fused_mtl_attn as f; a = f.available_backends(); print(a); assert a[\"cuda\"][0]'"
    run_step build 300 "$OUT/build.log" "
        $PY -m pip install --no-build-isolation --no-deps -v -e . && $CHECK_CUDA && exit 0
        echo '### pip install failed or the CUDA backend is unavailable: setup.py build_ext --inplace'
        $PY setup.py build_ext --inplace && $CHECK_CUDA"
    run_step gpu_tests 150 "$OUT/gpu_tests.log" \
        "$PY -m pytest -q -m gpu tests/test_cpp_ops.py tests/test_triton.py tests/test_fused_network.py --junitxml='$OUT/gpu_tests.xml'"
    TRAIN="--device cuda --configs nyud2,pascal5 --batch 8 --amp both --layouts --repeats ${TRAIN_REPEATS:-5}"
    OPS="--device cuda --batch 8 1 ${OPS_ARGS:-}"
fi

run_step train "$([ "$DRY" = 1 ] && echo 600 || echo 180)" "$OUT/train.log" "$PY benchmarks/bench_train.py $TRAIN --json '$OUT/train.json'"
run_step ops 600 "$OUT/ops.log" "$PY benchmarks/bench_ops.py $OPS --json '$OUT/ops.json'"
run_step plot 60 "$OUT/plot.log" \
    "$PY benchmarks/plot.py --ops '$OUT/ops.json' --train '$OUT/train.json' --out '$OUT' --summary '$OUT/summary.md.tmp' --steps '$OUT/steps.tsv'"
# the summary again, now with the plot step's own exit code
$PY benchmarks/plot.py --ops "$OUT/ops.json" --train "$OUT/train.json" --out "$OUT" --no-plots \
    --summary "$OUT/summary.md" --steps "$OUT/steps.tsv" > /dev/null 2>&1 || cp "$OUT/summary.md.tmp" "$OUT/summary.md" 2>/dev/null
rm -f "$OUT/summary.md.tmp"
echo
echo "=== total $(($(date +%s) - START)) s; logs, JSON, PNGs in $OUT"
echo
cat "$OUT/summary.md" 2>/dev/null || { echo "no summary; steps:"; cat "$OUT/steps.tsv"; }
