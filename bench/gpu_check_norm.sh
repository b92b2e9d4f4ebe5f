#!/usr/bin/env bash
# GPU check of the compiled CUDA norm kernels: build craft._C in place for this GPU, run the CUDA
# tests, then bench/gpu_check_norm.py (correctness vs float64, speed vs torch / Triton).
# Usable alone or from bench/gpu_check.sh. Logs and results go to ${OUT:-bench/results}/norm/.
# Extra arguments go to gpu_check_norm.py (e.g. --quick).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}/norm"
mkdir -p "$out"
status=0

arch="$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")" || {
    echo "gpu_check_norm: no CUDA device"
    exit 1
}
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}"
start=$(date +%s)
if CRAFT_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" python3 setup.py build_ext --inplace \
    >"$out/build.log" 2>&1; then
    echo "gpu_check_norm: built craft._C for sm_${arch/./} in $(($(date +%s) - start)) s"
else
    echo "gpu_check_norm: building craft._C FAILED (the JIT path will be tried); tail of build.log:"
    tail -n 30 "$out/build.log"
    status=1
fi

if python3 -m pytest -q -p no:cacheprovider tests/kernels/test_cuda_norm.py >"$out/pytest.log" 2>&1; then
    echo "gpu_check_norm: CUDA tests: $(tail -n 1 "$out/pytest.log")"
else
    echo "gpu_check_norm: CUDA tests FAILED:"
    grep -E "^(FAILED|ERROR)|Error" "$out/pytest.log" | head -n 30
    tail -n 3 "$out/pytest.log"
    status=1
fi

python3 bench/gpu_check_norm.py --out "$out" "$@" 2>&1 | tee "$out/check.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit "$status"
