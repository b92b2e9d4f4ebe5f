"""Shared by the Triton kernels: interpreter detection, autotune config lists, dot settings.

The interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors with numpy; it is how the
test suite checks them without a GPU. It is read once at import, as `triton.jit` does.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
# CRAFT_TRITON_AUTOTUNE=0 keeps only the first (default) config of every autotuned kernel: the
# GPU correctness grid uses it so that it compiles a handful of kernels instead of every config.
AUTOTUNE: bool = os.environ.get("CRAFT_TRITON_AUTOTUNE", "1") != "0"

HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def configs(
    full: list[tuple[dict[str, int], int, int]], interpret: dict[str, int]
) -> list[triton.Config]:
    """Autotune configs: the full list on a GPU, one small config under the interpreter.

    Each entry of `full` is (meta-parameters, num_warps, num_stages); the first is the default.
    """
    if INTERPRET:
        return [triton.Config(interpret, num_warps=1, num_stages=1)]
    chosen = full if AUTOTUNE else full[:1]
    return [triton.Config(dict(m), num_warps=w, num_stages=s) for m, w, s in chosen]


def upcast_dots(dtype: torch.dtype) -> bool:
    """Whether tl.dot inputs must be widened to fp32: the interpreter's bf16 dot is wrong.

    On a GPU the kernels always multiply in the input dtype with fp32 accumulation; widening bf16
    to fp32 under the interpreter computes the same exact products, so results match.
    """
    return INTERPRET and dtype == torch.bfloat16


@torch.compiler.assume_constant_result  # read while tracing: torch.compile cannot trace it
def tf32_matmuls_allowed() -> bool:
    """Whether torch lets fp32 CUDA matmuls use TF32, through either of its two settings APIs.

    Reading the legacy `matmul.allow_tf32` raises once the newer `fp32_precision` API has been
    used (torch >= 2.9), so the newer setting is read first where it exists.
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch < 2.9: only the legacy flag exists
        return bool(matmul.allow_tf32)
    if precision == "none":  # not set for matmuls: the backend-wide default decides
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for fp32 inputs: tf32 only when torch allows it for matmuls."""
    if dtype == torch.float32 and not tf32_matmuls_allowed():
        return "ieee"
    return "tf32"


@triton.jit
def _scale_kernel(T, S, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    s = tl.load(S).to(tl.float32)
    t = tl.load(T + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(T + offs, (t * s).to(T.dtype.element_ty), mask=ok)


def scale_(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """t *= s in place for a contiguous t, computed in fp32 and rounded once; s is a 0-d tensor.

    (Converting s to half first would make a GradScaler scale of 65536 inf in fp16.)
    """
    if not t.is_contiguous() or t.dtype == torch.float64:
        from craft.ops.lowp import scale_ as torch_scale_

        return torch_scale_(t, s)
    n = t.numel()
    if n:
        block = 1024 if not INTERPRET else 4096
        _scale_kernel[(triton.cdiv(n, block),)](t, s.reshape(()), n, BLOCK=block)
    return t
