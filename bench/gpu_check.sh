#!/usr/bin/env bash
# Check a GPU installation of Craft in one call: the Triton kernel tests compiled for this GPU over
# a real shape grid, the kernels against PyTorch's own (bench/triton_ops.py), `craft bench` for
# the kernel families, a short char_gpt training run on the triton backend next to the torch
# backend, the compiled CUDA norm kernels (bench/gpu_check_norm.sh), and a summary table last.
#
#   bench/gpu_check.sh              # on a CUDA machine; logs and JSON under $OUT (default outputs/gpu_check)
#   bench/gpu_check.sh --dry-run    # on a CPU: every step on tiny shapes, kernels in the Triton interpreter
#
# Needs Craft and its dependencies for $PYTHON (default python3): `pip install -e '.[dev]'`, or
# without network `pip install --no-index --find-links DIR -e '.[dev]'` from a directory of wheels;
# a CUDA build of torch and Triton 3.6 or later.
# GPU_CHECK_STEPS picks steps (default "tests,ops,bench,train,norm"; norm = the compiled CUDA
# norm kernels via bench/gpu_check_norm.sh), e.g. to split the check over two calls;
# GPU_CHECK_STEP_TIMEOUT (seconds, default 420) bounds each step. Each step's exit status lands in
# the summary; the script exits non-zero when a step failed.
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
DRY=0
case "${1:-}" in
    "") ;;
    --dry-run) DRY=1 ;;
    -h | --help)
        sed -n '2,/^set -u/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "usage: bench/gpu_check.sh [--dry-run]  (unknown argument: $1)" >&2
        exit 2
        ;;
esac
OUT=${OUT:-$REPO/outputs/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import pydantic, typer, accelerate, safetensors, rich" >/dev/null 2>&1; then
    echo "gpu_check: Craft's dependencies are not installed for $PY; run pip install -e '.[dev]'" >&2
    exit 2
fi

if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    GRID=0
else
    GRID=1
fi

WANT=${GPU_CHECK_STEPS:-tests,ops,bench,train,norm}
LIMIT=${GPU_CHECK_STEP_TIMEOUT:-420}
want() { [[ ",$WANT," == *",$1,"* ]]; }
STEPS=()
STATUS=()
NOTES=()
FAILED=0
record() {  # name status note
    STEPS+=("$1")
    STATUS+=("$2")
    NOTES+=("$3")
    [ "$2" = FAIL ] && FAILED=1
    return 0
}
elapsed() { echo "$(($(date +%s) - $1))s"; }

# ---------------------------------------------------------------------------- environment
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "mode: $([ "$DRY" = 1 ] && echo 'dry run (CPU, Triton interpreter)' || echo GPU)"
    "$PY" - <<'EOF'
import platform, torch
try:
    import triton
    tv = triton.__version__
except Exception as e:  # reported, the kernel steps will fail with the reason
    tv = f"not importable ({e})"
print("python:", platform.python_version())
print("torch:", torch.__version__, "cuda:", torch.version.cuda)
print("triton:", tv)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
EOF
    command -v nvidia-smi >/dev/null && [ "$DRY" = 0 ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# ---------------------------------------------------------------------------- 1. kernel tests
# Compiled on CUDA (TRITON_INTERPRET unset) with the large grid; one config per kernel so the grid
# compiles a handful of kernels instead of every autotune config (step 2 autotunes).
if want tests; then
    t0=$(date +%s)
    CRAFT_GPU_GRID=$GRID CRAFT_TRITON_AUTOTUNE=$([ "$DRY" = 1 ] && echo 1 || echo 0) \
        timeout "$LIMIT" "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_triton_attention.py \
        tests/kernels/test_triton_cross_entropy.py tests/kernels/test_triton_linear_cross_entropy.py \
        tests/kernels/test_triton_gpt.py --junitxml="$OUT/kernel_tests.xml" >"$OUT/kernel_tests.log" 2>&1
    rc=$?
    line=$(grep -E '(passed|failed|error)' "$OUT/kernel_tests.log" | tail -1)
    record "kernel tests (grid=$GRID)" "$([ $rc = 0 ] && echo PASS || echo FAIL)" "exit $rc: $line, $(elapsed "$t0")"
fi

# ---------------------------------------------------------------------------- 2. speed / memory
if want ops; then
    t0=$(date +%s)
    timeout "$LIMIT" "$PY" bench/triton_ops.py --out "$OUT/triton_ops.json" \
        $([ "$DRY" = 1 ] && echo --dry-run) >"$OUT/triton_ops.log" 2>&1
    rc=$?
    if [ $rc = 0 ]; then
        met=$(grep -c ' MET$' "$OUT/triton_ops.log")
        missed=$(grep -c ' MISSED$' "$OUT/triton_ops.log")
        record "triton vs torch (bench/triton_ops.py)" PASS "targets met $met, missed $missed, $(elapsed "$t0")"
    else
        record "triton vs torch (bench/triton_ops.py)" FAIL "exit $rc, see triton_ops.log"
    fi
fi

# ---------------------------------------------------------------------------- 3. craft bench
# The shapes the kernels are built for, every implementation: a full default sweep takes long.
bench_args() {
    if [ "$DRY" = 1 ]; then echo "--quick --device cpu"; return; fi
    case $1 in
        attention) echo "--device cuda --dtype bfloat16 --seq-lens 1024,4096 --head-dim 128 --heads 16" ;;
        cross-entropy) echo "--device cuda --dtype bfloat16 --vocab 50257" ;;
        linear-cross-entropy) echo "--device cuda --dtype bfloat16 --vocab 128256" ;;
    esac
}
if ! want bench; then
    :
elif "$PY" -m craft bench --help >"$OUT/craft_bench_help.log" 2>&1; then
    for fam in attention cross-entropy linear-cross-entropy; do
        t0=$(date +%s)
        # shellcheck disable=SC2046
        timeout "$LIMIT" "$PY" -m craft bench "$fam" $(bench_args "$fam") \
            --json "$OUT/craft_bench_$fam.json" >"$OUT/craft_bench_$fam.log" 2>&1
        rc=$?
        record "craft bench $fam" "$([ $rc = 0 ] && echo PASS || echo FAIL)" "exit $rc, $(elapsed "$t0")"
    done
else
    record "craft bench" SKIP "not available: $(tail -1 "$OUT/craft_bench_help.log")"
fi

# ---------------------------------------------------------------------------- 4. training run
# char_gpt on tinyshakespeare when the data mirror is reachable, else on this repository's own
# Python sources as characters (the device machine has no network and no data mirror);
# triton kernels vs torch kernels, same seed and steps.
MIRROR=${CRAFT_DATA_MIRROR:-}
if [ -n "$MIRROR" ] && [ -f "$MIRROR/tinyshakespeare/input.txt" ]; then
    DATA='source = "tinyshakespeare"'
else
    # one snapshot, so both runs read the same text
    mkdir -p "$OUT/train_text"
    find "$REPO/craft" -name '*.py' | sort | xargs cat >"$OUT/train_text/corpus.txt"
    DATA="files = [\"$OUT/train_text/corpus.txt\"]"
fi
if [ "$DRY" = 1 ]; then
    MODEL=gpt-debug; TRAIN='max_steps = 4
batch_size = 4
precision = "no"'; EVAL='interval = 2
batches = 2'; RUN='cpu = true'
else
    MODEL=gpt-char; TRAIN='max_steps = 300
batch_size = 64
precision = "bf16"'; EVAL='interval = 150
batches = 20'; RUN=''
fi
for kern in triton torch; do
    want train || break
    recipe="$OUT/train_$kern.toml"
    cat >"$recipe" <<EOF
include = ["$REPO/configs/model/$MODEL.toml", "$REPO/configs/optim/adamw-cosine.toml"]
[run]
name = "gpu_check_$kern"
output_dir = "$OUT/runs"
$RUN
[data]
type = "tokens"
$DATA
[tokenizer]
type = "char"
[training]
$TRAIN
[eval]
$EVAL
[checkpoint]
interval = 100000
save_at_end = false
[logging]
plot = false
sample_interval = 0
progress = "plain"
[kernels]
attention = "$kern"
cross_entropy = "$kern"
EOF
    t0=$(date +%s)
    timeout "$LIMIT" "$PY" -m craft train "$recipe" >"$OUT/train_$kern.log" 2>&1
    rc=$?
    last=$(grep -iE 'val|loss' "$OUT/train_$kern.log" | tail -1 | tr -s ' ' | cut -c1-90)
    record "train char_gpt kernels=$kern" "$([ $rc = 0 ] && echo PASS || echo FAIL)" \
        "exit $rc, $(elapsed "$t0"); $last"
done

# ---------------------------------------------------------------------------- CUDA norm kernels
if want norm; then
    if [ "$DRY" = 1 ]; then
        record "cuda norm (build, tests, bench)" SKIP "needs a GPU; on CPU .ci/compile_cuda checks the sources"
    else
        t0=$(date +%s)
        OUT="$OUT" timeout "$LIMIT" bash bench/gpu_check_norm.sh >"$OUT/norm_check.log" 2>&1
        rc=$?
        record "cuda norm (build, tests, bench)" "$([ $rc = 0 ] && echo PASS || echo FAIL)" \
            "exit $rc, $(elapsed "$t0"); see norm/ and norm_check.log"
    fi
fi

# ---------------------------------------------------------------------------- summary
{
    echo
    echo "== gpu_check summary ($(grep -E '^device:' "$OUT/env.txt" | cut -d' ' -f2-), $(grep -E '^triton:' "$OUT/env.txt")) =="
    printf '%-42s %-5s %s\n' step status notes
    for i in "${!STEPS[@]}"; do
        printf '%-42s %-5s %s\n' "${STEPS[$i]}" "${STATUS[$i]}" "${NOTES[$i]}"
    done
    if [ -f "$OUT/triton_ops.log" ]; then
        echo
        grep -vE '^(Traceback|  )' "$OUT/triton_ops.log" | tail -12
    fi
} | tee "$OUT/summary.txt"
exit $FAILED
