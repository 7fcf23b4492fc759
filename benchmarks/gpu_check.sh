#!/usr/bin/env bash
# The one script for a GPU machine (an H100/H200 with PyTorch + Triton, nvcc and ninja, no network): build, every
# GPU test, the op and training-step benchmarks, in at most 9 minutes (GPU_CHECK_BUDGET, default 540 s).
#
#   bash benchmarks/gpu_check.sh OUTDIR                  # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --cpu-dry-run OUTDIR    # the same steps on a CPU: no build, the tests collected
#                                                        # only, the benchmarks at tiny sizes
#
# Steps, in order of what a short GPU session needs most; each under `timeout` with its own cap, cut to what is left
# of the budget; each writes its files before the next starts; a failed step does not stop the next. Exit codes go
# to OUTDIR/steps.tsv and the summary (124 = timed out, "skipped" = no time left).
#   step            cap (s)  what                                                   -> OUTDIR/
#   env               30     nvidia-smi, versions, available backends, auto's choice   env.log
#   build            180     pip install -e . for this GPU's architecture only, in parallel; fails loudly when the
#                            CUDA kernels are not in the build                         build.log
#   kernel_tests     150     the whole of test_cpp_ops.py, test_triton.py, test_cuda_sync.py, with the GPU backends
#                                                                                      kernel_tests.log, .xml
#   network_tests     90     the GPU tests of test_fused_network.py (float64 parity per GPU backend, float32, bf16)
#                                                                                      network_tests.log, .xml
#   ops               90     bench_ops.py at the paper's per-scale shapes, batch 8    ops.json, ops.log
#   cuda_tune         45     tune_kernels.py --backend cuda: the CUDA kernels' grid shapes (blocks per launch,
#                            pieces per segment, one-pass query side) at the 1/4 scale  cuda_tune.json, .log
#   triton_tune       60     tune_kernels.py: the Triton kernels' candidate launch configs at the 1/4 scale,
#                            bf16 and fp32 (which config to ship)                      triton_tune.json, .log
#   train            150     bench_train.py NYUD 480x640 2 tasks, PASCAL 512x512 5 tasks, batch 8, fp32 and bf16
#                            autocast, reference vs fused: time, saved and peak memory train.json, train.log
#   train_compiled   300     the same for NYUD fp32 with torch.compile of the reference (last: it takes what is
#                            left; compilation is slow)                                train_compiled.json, .log
#   plot              20     PNGs and summary.md (printed last)
# The JSON files are rewritten after every case, so a step cut short keeps what it measured.
# Through the device tool (which returns at most 8 files from $OUT, so the folder comes back as one archive, written
# on exit whatever happened; the summary is the output's tail):
#   GPU_CHECK_ARCHIVE=$OUT/gpu_check.tgz bash benchmarks/gpu_check.sh /tmp/gpu_check      (timeout_s 600)
# Environment: PYTHON (default: the first of .venv/bin/python, python3, python that imports torch), GPU_CHECK_BUDGET,
# GPU_CHECK_ARCHIVE (a .tgz of OUTDIR written on exit),
# TRAIN_REPEATS (5), OPS_ARGS (extra bench_ops arguments, e.g. "--batch 1 8"), CUDA_HOME (default: /usr/local/cuda if
# it has nvcc, else the toolkit of the nvcc on PATH), TORCH_CUDA_ARCH_LIST (default: this GPU's), MAX_JOBS (nproc).
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
PY=${PYTHON:-}
if [ -z "$PY" ]; then  # the first interpreter that has torch (on the GPU machine that is python3, not always python)
    for candidate in .venv/bin/python python3 python; do
        if "$candidate" -c 'import torch' >/dev/null 2>&1; then PY=$candidate; break; fi
    done
    PY=${PY:-python3}
fi
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-$([ "$DRY" = 1 ] && echo 2400 || echo 540)}
RESERVE=20  # seconds kept for plot + summary
: > "$OUT/steps.tsv"
if [ -n "${GPU_CHECK_ARCHIVE:-}" ]; then
    trap 'tar -czf "$GPU_CHECK_ARCHIVE" -C "$(dirname "$OUT")" "$(basename "$OUT")"' EXIT
fi

record() {  # name, exit code, seconds
    printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$OUT/steps.tsv"
    echo "=== step $1: exit $2 after $3 s"
}

# run_step NAME CAP_S LOG COMMAND: COMMAND (a bash string) under timeout, output to LOG, its tail on the console;
# the caps are the GPU's, times 4 in a dry run (a shared 2-core CPU)
run_step() {
    local name=$1 limit=$(($2 * (DRY ? 4 : 1))) log=$3 cmd=$4
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

AUTO_CHOICE="import torch, fused_mtl_attn as f; from fused_mtl_attn import backends as b; \
dev = 'cuda' if torch.cuda.is_available() else 'cpu'; q = torch.zeros(1, 1, 2, 3, device=dev); \
print('auto on', dev, {op: b.select('auto', q, op).name for op in b.OPS})"
run_step env 30 "$OUT/env.log" "
    (nvidia-smi -L || echo 'nvidia-smi: not available') 2>&1
    $PY -c 'import sys, torch; print(\"python\", sys.version.split()[0]); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.is_available() and torch.cuda.get_device_name())'
    $PY -c 'import triton; print(\"triton\", triton.__version__)' || echo 'triton: not importable'
    $PY -c 'import matplotlib; print(\"matplotlib\", matplotlib.__version__)' || echo 'matplotlib: missing (plots will be skipped)'
    nvcc --version 2>/dev/null | tail -n 1; ninja --version 2>/dev/null | sed 's/^/ninja /'"
cat "$OUT/env.log"

TESTS_KERNELS="tests/test_cpp_ops.py tests/test_triton.py tests/test_cuda_sync.py tests/test_cuda_compile.py"
if [ "$DRY" = 1 ]; then
    record build skipped 0
    COLLECT="--collect-only"  # the test commands and their collection, not the tests
    TRAIN="--device cpu --batch 1 --size 64 64 --widths 12 24 48 96 --repeats 1"
    TRAIN_STEPS="--configs nyud2,pascal5 --amp both"
    OPS="--device cpu --quick --positions-scale 0.25 --min-run-time 0.02"
    TUNE="TRITON_INTERPRET=1 $PY -m benchmarks.tune_kernels --device cpu --batch 1 --positions-scale 0.02 --pairs 2 \
          --dtypes float32 --configs 32/32/8 --min-run-time 0.01"
    CUDA_TUNE="$PY -m benchmarks.tune_kernels --help"  # needs a GPU: here only its command line
else
    COLLECT=""
    if [ -z "${CUDA_HOME:-}" ]; then  # the toolkit itself: the nvcc on PATH may be a wrapper script
        if [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda
        elif command -v nvcc >/dev/null 2>&1; then CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
        fi
    fi
    export CUDA_HOME=${CUDA_HOME:-/nonexistent}
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c \
        'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo "9.0")}
    # the build counts only if the extension loads with its CUDA kernels
    CHECK_CUDA="$PY -c 'import fused_mtl_attn as f; a = f.available_backends(); print(a); assert a[\"cuda\"][0], a[\"cuda\"][1]'"
    run_step build 180 "$OUT/build.log" "
        echo CUDA_HOME=\$CUDA_HOME TORCH_CUDA_ARCH_LIST=\$TORCH_CUDA_ARCH_LIST MAX_JOBS=\$MAX_JOBS
        test -x \"\$CUDA_HOME/bin/nvcc\" || { echo 'no CUDA toolkit: set CUDA_HOME to the folder with bin/nvcc'; exit 3; }
        FORCE_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -v -e . && $CHECK_CUDA && exit 0
        echo '### pip install failed or the CUDA backend is unavailable: setup.py build_ext --inplace'
        FORCE_CUDA=1 $PY setup.py build_ext --inplace && $CHECK_CUDA"
    if ! grep -q "^build	0	" "$OUT/steps.tsv"; then
        echo "##########################################################################################"
        echo "### FAILED: the CUDA kernels were not built (see $OUT/build.log); the tests below fail on it"
        echo "##########################################################################################"
    fi
    # conftest.py turns a missing GPU or GPU backend into a failure instead of skips
    export FUSED_MTL_ATTN_REQUIRE_GPU=1
    TRAIN="--device cuda --batch 8 --repeats ${TRAIN_REPEATS:-5}"
    TRAIN_STEPS="--configs nyud2,pascal5 --amp both"
    OPS="--device cuda --batch 8 ${OPS_ARGS:-}"
    TUNE="$PY -m benchmarks.tune_kernels --device cuda --batch 8"
    CUDA_TUNE="$TUNE --backend cuda --json '$OUT/cuda_tune.json'"
fi

$PY -c "$AUTO_CHOICE" 2>&1 | tee -a "$OUT/env.log"  # after the build, so that the compiled backends load
run_step kernel_tests 150 "$OUT/kernel_tests.log" \
    "$PY -m pytest -q $COLLECT $TESTS_KERNELS --junitxml='$OUT/kernel_tests.xml'"
run_step network_tests 90 "$OUT/network_tests.log" \
    "$PY -m pytest -q $COLLECT -m gpu tests/test_fused_network.py --junitxml='$OUT/network_tests.xml'"
run_step ops 90 "$OUT/ops.log" "$PY -m benchmarks.bench_ops $OPS --json '$OUT/ops.json'"
run_step cuda_tune 45 "$OUT/cuda_tune.log" "$CUDA_TUNE"
run_step triton_tune 60 "$OUT/triton_tune.log" "$TUNE --json '$OUT/triton_tune.json'"
run_step train 150 "$OUT/train.log" "$PY -m benchmarks.bench_train $TRAIN $TRAIN_STEPS --json '$OUT/train.json'"
run_step train_compiled 300 "$OUT/train_compiled.log" \
    "$PY -m benchmarks.bench_train $TRAIN --configs nyud2 --amp off --compile --json '$OUT/train_compiled.json'"
TRAIN_JSON="'$OUT/train.json' '$OUT/train_compiled.json'"
run_step plot 20 "$OUT/plot.log" \
    "$PY -m benchmarks.plot --ops '$OUT/ops.json' --train $TRAIN_JSON --out '$OUT' --summary '$OUT/summary.md.tmp' --steps '$OUT/steps.tsv'"
# the summary again, now with the plot step's own exit code
eval "$PY -m benchmarks.plot --ops '$OUT/ops.json' --train $TRAIN_JSON --out '$OUT' --no-plots \
    --summary '$OUT/summary.md' --steps '$OUT/steps.tsv'" > /dev/null 2>&1 || cp "$OUT/summary.md.tmp" "$OUT/summary.md" 2>/dev/null
rm -f "$OUT/summary.md.tmp"
echo
echo "=== total $(($(date +%s) - START)) s; logs, JSON, PNGs in $OUT"
echo
cat "$OUT/summary.md" 2>/dev/null || { echo "no summary; steps:"; cat "$OUT/steps.tsv"; }
