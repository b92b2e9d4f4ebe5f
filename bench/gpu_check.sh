#!/usr/bin/env bash
# Check an installation of Craft on a CUDA GPU: kernels, speed targets and a training run, in
# steps that can run in separate calls. Every step writes its results, logs and the machine it ran on (device, driver, torch/triton/CUDA versions, date)
# under $OUT (default bench/results/gpu_check), so a later call or a failed step loses nothing.
#
#   bench/gpu_check.sh [--dry-run] [STEP ...]      default steps: build correct speed train summary
#
#   build    compile craft._C (the CUDA norm kernels) in place for this GPU's architecture
#   correct  CUDA correctness: the Triton kernels over the large grid (CRAFT_GPU_GRID=1), the cuda
#            norm incl. the autocast mixed dtypes, fp16 losses under GradScaler-sized scales and no
#            host sync, torch.compile (inductor, fullgraph) of a GPT on triton+cuda kernels
#   speed    the targets, against PyTorch in the same run: attention fwd+bwd vs SDPA flash at
#            T=4096 D=128 causal bf16, cross-entropy fwd+bwd >= 2x F.cross_entropy at <= 1/3 of
#            its memory, linear + cross-entropy < 1/4 of eager memory at V=128k
#            (bench/triton_ops.py); fused norm >= 1.5x F.layer_norm / F.rms_norm at 16k x 4096
#            bf16, plus the autocast case (bench/gpu_check_norm.py)
#   train    char_gpt (nanoGPT's shakespeare-char model) in bf16 on triton+cuda kernels and on
#            torch kernels, same seed and data: loss curves, val losses, tokens/s ratio
#            (bench/gpu_check_train.py). Attention dropout is off in both runs, so that training
#            attention runs on the Triton kernel (which has no dropout) rather than on SDPA.
#   summary  collate the steps' results into summary.md (no GPU needed)
#
# The whole check takes about 10-15 minutes on one H100/H200-class GPU; it can be split, e.g.
#   bench/gpu_check.sh build correct          (~1-2 + ~3-5 min)
#   bench/gpu_check.sh speed train summary    (~3-4 + ~2-3 min)
# Each step is bounded by GPU_CHECK_STEP_TIMEOUT seconds (default 400). A step that needs
# craft._C builds it when the checkout lacks it.
#
# On a machine without network: put the wheels of Craft's dependencies into .whl/ in the checkout
# (ignored by git; they are installed into /tmp/site when pydantic is missing), and tinyshakespeare
# as .data/tinyshakespeare/input.txt (CRAFT_DATA_MIRROR defaults to .data); without it the train
# step learns this repository's Python sources as characters.
#
# --dry-run runs every step on the CPU on tiny shapes (Triton interpreter), to test the plumbing;
# its numbers mean nothing and it writes under outputs/gpu_check_dry unless $OUT is set.
# Exit status: non-zero when a step failed; the summary names it.
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
DRY=0
STEPS=()
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        -h | --help)
            sed -n '2,/^set -u/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        build | correct | speed | train | summary) STEPS+=("$arg") ;;
        *)
            echo "usage: bench/gpu_check.sh [--dry-run] [build|correct|speed|train|summary ...]" \
                "(unknown argument: $arg)" >&2
            exit 2
            ;;
    esac
done
[ ${#STEPS[@]} -eq 0 ] && read -r -a STEPS <<<"${GPU_CHECK_STEPS:-build correct speed train summary}"
if [ "$DRY" = 1 ]; then
    OUT=${OUT:-$REPO/outputs/gpu_check_dry}
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
else
    OUT=${OUT:-$REPO/bench/results/gpu_check}
fi
mkdir -p "$OUT/logs"
PY=${PYTHON:-python3}
LIMIT=${GPU_CHECK_STEP_TIMEOUT:-400}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export CRAFT_DATA_MIRROR=${CRAFT_DATA_MIRROR:-$REPO/.data}
WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/craft_gpu_check}  # prepared data, corpus: not results
mkdir -p "$WORK"
export CRAFT_HOME=${CRAFT_HOME:-$WORK/craft_home}
FAILED=0

if ! "$PY" -c "import pydantic" >/dev/null 2>&1 && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

# ---------------------------------------------------------------------------------- helpers
env_json() {  # the machine this step ran on (craft.bench.hardware.machine_info) -> $OUT/<step>.env.json
    "$PY" - "$1" "$DRY" <<'EOF' >"$OUT/$1.env.json" 2>/dev/null || echo "{}" >"$OUT/$1.env.json"
import json, subprocess, sys
import torch
from craft.bench.hardware import machine_info
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
info = {"step": sys.argv[1], "dry_run": sys.argv[2] == "1", **machine_info(device)}
try:
    info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, timeout=10).stdout.strip() or None
except Exception:
    info["commit"] = None
print(json.dumps(info, indent=1))
EOF
}

finish() {  # step rc start note -> $OUT/<step>.status.json
    local step=$1 rc=$2 start=$3 note=$4 status
    status=$([ "$rc" = 0 ] && echo PASS || echo FAIL)
    [ "$rc" = 0 ] || FAILED=1
    printf '{"step": "%s", "status": "%s", "exit": %s, "seconds": %s, "note": "%s"}\n' \
        "$step" "$status" "$rc" "$(($(date +%s) - start))" "${note//\"/\'}" >"$OUT/$step.status.json"
    echo "gpu_check: $step $status (exit $rc, $(($(date +%s) - start)) s) $note"
}

have_extension() { "$PY" -c "import craft._C" >/dev/null 2>&1; }

build_extension() {  # -> 0 when craft._C imports afterwards
    local arch
    arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || return 1
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} CRAFT_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
        timeout "$LIMIT" "$PY" setup.py build_ext --inplace >"$OUT/logs/build.log" 2>&1 && have_extension
}

# ------------------------------------------------------------------------------------ steps
step_build() {
    if [ "$DRY" = 1 ]; then
        echo "dry run: the CUDA extension needs a GPU; .ci/compile_cuda checks the sources" \
            >"$OUT/logs/build.log"
        return 0
    fi
    build_extension
}

step_correct() {
    local grid=1 autotune=0 files
    files=(tests/kernels tests/models/test_compile.py tests/ops/test_norm_mixed_precision.py
        tests/ops/test_eager_torch.py)
    if [ "$DRY" = 1 ]; then
        grid=0 autotune=1
        files=(tests/kernels/test_loss_scaling.py tests/ops/test_norm_mixed_precision.py)
    elif ! have_extension; then
        build_extension || return 1
    fi
    CRAFT_GPU_GRID=$grid CRAFT_TRITON_AUTOTUNE=$autotune timeout "$LIMIT" "$PY" -m pytest -q \
        -p no:cacheprovider -rfE "${files[@]}" --junitxml="$OUT/correct.xml" \
        >"$OUT/logs/correct.log" 2>&1
    local rc=$?
    grep -E '^(FAILED|ERROR)' "$OUT/logs/correct.log" | head -40 >"$OUT/correct.failures.txt"
    tail -n 1 "$OUT/logs/correct.log" >"$OUT/correct.txt"
    return $rc
}

step_speed() {
    local rc=0
    if [ "$DRY" = 1 ]; then
        timeout "$LIMIT" "$PY" bench/triton_ops.py --dry-run --out "$OUT/triton_ops.json" \
            >"$OUT/logs/triton_ops.log" 2>&1 || rc=1
        echo "dry run: bench/gpu_check_norm.py needs a GPU" >"$OUT/logs/norm.log"
        return $rc
    fi
    have_extension || build_extension || rc=1
    timeout "$LIMIT" "$PY" bench/triton_ops.py --out "$OUT/triton_ops.json" \
        >"$OUT/logs/triton_ops.log" 2>&1 || rc=1
    timeout "$LIMIT" "$PY" bench/gpu_check_norm.py --quick --out "$OUT" \
        >"$OUT/logs/norm.log" 2>&1 || rc=1
    return $rc
}

step_train() {
    local data model train_cfg eval_cfg run_cfg kern rc=0
    if [ -f "$CRAFT_DATA_MIRROR/tinyshakespeare/input.txt" ]; then
        data='source = "tinyshakespeare"'
    else  # no data mirror on the device: this repository's sources, one snapshot for both runs
        find "$REPO/craft" -name '*.py' | sort | xargs cat >"$WORK/corpus.txt"
        data="files = [\"$WORK/corpus.txt\"]"
    fi
    if [ "$DRY" = 1 ]; then
        model=gpt-debug run_cfg='cpu = true'
        train_cfg=$'max_steps = 6\nbatch_size = 2\nprecision = "bf16"\nlog_interval = 1'
        eval_cfg=$'interval = 3\nwindows = 4'
    else
        model=gpt-char run_cfg=''
        train_cfg=$'max_steps = 600\nbatch_size = 64\nprecision = "bf16"\nlog_interval = 10'
        eval_cfg=$'interval = 200\nwindows = 1280'
    fi
    [ "$DRY" = 0 ] && { have_extension || build_extension || return 1; }
    for kern in fused torch; do
        local recipe="$OUT/train_$kern.toml" names
        if [ "$kern" = fused ]; then
            names=$'attention = "triton"\ncross_entropy = "triton"\nlinear_cross_entropy = "triton"'
            names+=$([ "$DRY" = 1 ] && echo "" || echo $'\nnorm = "cuda"')
        else
            names=$'attention = "torch"\ncross_entropy = "torch"\nlinear_cross_entropy = "torch"\nnorm = "torch"'
        fi
        cat >"$recipe" <<EOF
include = ["$REPO/configs/model/$model.toml", "$REPO/configs/optim/adamw-cosine.toml"]
[run]
name = "gpu_check_$kern"
output_dir = "$OUT/runs"
$run_cfg
[model]
attn_dropout = 0.0
[data]
type = "tokens"
$data
[tokenizer]
type = "char"
[training]
$train_cfg
[eval]
$eval_cfg
at_end = true
[checkpoint]
interval = 100000
save_at_end = false
export = false
[logging]
plot = false
sample_interval = 0
progress = "plain"
[kernels]
$names
EOF
        timeout "$LIMIT" "$PY" -m craft train "$recipe" >"$OUT/logs/train_$kern.log" 2>&1 || rc=1
    done
    [ $rc = 0 ] || return 1
    local a b
    a=$(ls -d "$OUT"/runs/gpu_check_fused/*/ | tail -n 1)
    b=$(ls -d "$OUT"/runs/gpu_check_torch/*/ | tail -n 1)
    "$PY" bench/gpu_check_train.py "$a" "$b" --labels "triton+cuda,torch" --out "$OUT" \
        --meta "$OUT/train.env.json" $([ "$DRY" = 1 ] && echo "--window 2 --skip 1") \
        >"$OUT/logs/train_report.log" 2>&1
}

step_summary() {
    {
        echo "# GPU check of the kernels"
        echo
        for f in "$OUT"/*.env.json; do
            [ -f "$f" ] || continue
            "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print('- {step}: {device_name}, torch {torch}, CUDA {cuda}, triton {triton}, driver {drv}, {date}, commit {commit}, load {load_avg}'.format(drv=d.get('cuda_driver') or '-', **{k: d.get(k) for k in ('step','device_name','torch','cuda','triton','date','commit','load_avg')}))" "$f"
        done
        echo
        echo "| step | status | seconds | note |"
        echo "|---|---|---|---|"
        for f in "$OUT"/*.status.json; do
            [ -f "$f" ] || continue
            "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print(f\"| {d['step']} | {d['status']} | {d['seconds']} | {d['note']} |\")" "$f"
        done
        if [ -f "$OUT/correct.txt" ]; then
            echo
            echo "correctness: $(cat "$OUT/correct.txt")"
            [ -s "$OUT/correct.failures.txt" ] && sed 's/^/    /' "$OUT/correct.failures.txt"
        fi
        if [ -f "$OUT/logs/triton_ops.log" ]; then
            echo
            echo '```'
            grep -vE '^(Traceback|  )' "$OUT/logs/triton_ops.log" | tail -n 12
            echo '```'
        fi
        [ -f "$OUT/norm_check.json" ] && echo && "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['meta']['target'])" "$OUT/norm_check.json"
        [ -f "$OUT/train.md" ] && echo && sed -n '/tokens\/s ratio/,$p' "$OUT/train.md"
    } >"$OUT/summary.md"
    cat "$OUT/summary.md"
}

notes() {  # a one-line result per step for its status file
    case $1 in
        build) have_extension && echo "craft._C imports" || tail -n 1 "$OUT/logs/build.log" ;;
        correct) cat "$OUT/correct.txt" 2>/dev/null ;;
        speed)
            echo "$(grep -c ' MET$' "$OUT/logs/triton_ops.log" 2>/dev/null) met, $(grep -c ' MISSED$' "$OUT/logs/triton_ops.log" 2>/dev/null) missed"
            ;;
        train) grep -E 'tokens/s ratio|same loss curve' "$OUT/train.md" 2>/dev/null | tr '\n' ' ' ;;
    esac
}

for step in "${STEPS[@]}"; do
    start=$(date +%s)
    if [ "$step" = summary ]; then
        step_summary
        continue
    fi
    env_json "$step"
    echo "gpu_check: $step ..."
    "step_$step"
    rc=$?
    finish "$step" "$rc" "$start" "$(notes "$step")"
done
exit $FAILED
