"""The `cuda` backend: compiled fused (residual add +) LayerNorm / RMSNorm kernels from `kernels/`.

`pip install --no-build-isolation .` on a machine with a CUDA toolkit and a CUDA build of torch
builds them as the extension `craft._C`. When that module is missing, the first use on a CUDA
machine compiles the same sources just in time (torch.utils.cpp_extension.load) into
`<CRAFT_HOME>/torch_extensions/`, once; later processes reuse that build (a build folder that
another user owns or can write is refused, since the library found there is loaded).
`CRAFT_CUDA_JIT=0` turns the just-in-time build off.

The kernels take x and residual in float32/float16/bfloat16 with weight/bias of any of those
dtypes and compute in float32. They follow the mixed-precision contract of `craft.ops.eager`:
s = x + residual is rounded once to the promoted dtype (a bf16 attention output on the fp32
residual stream gives an fp32 sum), y is rounded once to the autocast dtype when autocast is on
(else to s's dtype), and each gradient comes back in its input's dtype, the branch's written by the
backward kernel itself. Supported (x, s, y): all equal; (fp32, fp32, h), (h, fp32, h) and
(h, fp32, fp32) for h in {fp16, bf16}. Other mixes (e.g. a bf16 branch under fp16 autocast) are
rejected by `supports`, so `auto` takes the torch backend for them.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

from craft.errors import KernelError
from craft.ops.eager import check_norm, norm_dtypes
from craft.ops.registry import register_backend
from craft.paths import cache_dir

log = logging.getLogger("craft.ops")

# Kept in step with setup.py (SOURCES, NVCC_FLAGS, CXX_FLAGS).
SOURCES = ("norm_fwd.cu", "norm_bwd.cu", "norm_binding.cpp")
HEADERS = ("norm.h", "norm_common.cuh")
NVCC_FLAGS = ["-O3", "-lineinfo"]
CXX_FLAGS = ["-O3"]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_COLS = 2**31 - 2

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "module" / "reason", filled once by _load()


def kernel_source_dir() -> Path | None:
    """The directory holding the kernel sources: kernels/ of a checkout, or the wheel's copy."""
    here = Path(__file__).resolve()
    for cand in (here.parents[2] / "kernels", here.parents[1] / "_kernels"):
        if all((cand / name).is_file() for name in SOURCES + HEADERS):
            return cand
    return None


def _build_name(src: Path) -> str:
    """Extension name keyed by the sources, torch and CUDA versions (a stale build is never reused)."""
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((src / name).read_bytes())
    h.update(f"{torch.__version__}|{torch.version.cuda}|{NVCC_FLAGS}|{CXX_FLAGS}".encode())
    h.update(os.environ.get("TORCH_CUDA_ARCH_LIST", "").encode())
    return f"craft_norm_{h.hexdigest()[:12]}"


def _jit_build() -> tuple[ModuleType | None, str | None]:
    """Compile the sources with torch.utils.cpp_extension.load; (module, None) or (None, why)."""
    if os.environ.get("CRAFT_CUDA_JIT", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, (
            "the prebuilt extension craft._C is not installed and CRAFT_CUDA_JIT=0 turns off "
            "the just-in-time build"
        )
    src = kernel_source_dir()
    if src is None:
        return None, "craft._C is not installed and the kernel sources (kernels/) are not found"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return None, (
            "craft._C is not installed and no CUDA toolkit (nvcc) is found to build it; "
            "set CUDA_HOME or reinstall with `pip install --no-build-isolation .`"
        )
    if not cpp_extension.is_ninja_available():
        return None, "craft._C is not installed and building it needs ninja (pip install ninja)"
    name = _build_name(src)
    try:  # a build folder another user could write would let them plant the loaded library
        build_dir = cache_dir("torch_extensions", name, error=KernelError)
    except KernelError as e:
        return None, f"craft._C is not installed and the just-in-time build is refused: {e}"
    log.warning(
        "compiling the CUDA norm kernels (first use; this takes a minute or two) into %s", build_dir
    )
    start = time.perf_counter()
    try:
        module = cpp_extension.load(
            name=name,
            sources=[str(src / s) for s in SOURCES],
            extra_cflags=CXX_FLAGS,
            extra_cuda_cflags=NVCC_FLAGS,
            extra_include_paths=[str(src)],
            build_directory=str(build_dir),
            verbose=os.environ.get("CRAFT_CUDA_VERBOSE", "0") == "1",
        )
    except Exception as e:  # compiler errors arrive as RuntimeError / CalledProcessError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"just-in-time build failed in {build_dir}: {first}"
    log.warning("compiled the CUDA norm kernels in %.0f s", time.perf_counter() - start)
    return module, None


def _load() -> tuple[ModuleType | None, str | None]:
    """The extension module, or None and the reason it cannot be had. Computed once per process."""
    with _lock:
        if not _state:
            module, reason = None, None
            if torch.version.cuda is None:
                reason = f"torch {torch.__version__} is a CPU-only build"
            elif not torch.cuda.is_available():
                reason = "no CUDA device (torch.cuda.is_available() is False)"
            else:
                try:
                    module = importlib.import_module("craft._C")
                except ImportError as e:
                    if not (isinstance(e, ModuleNotFoundError) and e.name == "craft._C"):
                        log.warning("prebuilt craft._C does not load (%s); rebuilding it", e)
                    module, reason = _jit_build()
            _state.update(module=module, reason=reason)
        return _state["module"], _state["reason"]


def available() -> str | None:
    """None when the kernels can run here, else the precise reason they cannot."""
    return _load()[1]


def extension() -> ModuleType:
    """The loaded extension; raises KernelError with the reason when it is not available."""
    module, reason = _load()
    if module is None:
        raise KernelError(f"kernels.norm = 'cuda' is not available: {reason}")
    return module


def supports(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    kind: str,
    residual: torch.Tensor | None,
) -> str | None:
    """None when the kernels accept these inputs, else why not."""
    if x.device.type != "cuda":
        return f"x is on {x.device}, not a CUDA device"
    return input_problem(x, weight, bias, residual)


def dtypes_supported(x: torch.dtype, s: torch.dtype, y: torch.dtype) -> bool:
    """Whether the kernels take (x, sum, y) dtypes; mirrors norm_dtypes_supported in norm.h."""
    if x == s == y:
        return x in DTYPES
    if s != torch.float32 or x not in DTYPES or y not in DTYPES:
        return False
    x_half, y_half = x != torch.float32, y != torch.float32
    return (x_half or y_half) and (not (x_half and y_half) or x == y)


def input_problem(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> str | None:
    """Dtype/shape/device problems of the inputs that the kernels would reject, or None."""
    if x.dtype not in DTYPES:
        return f"x has dtype {x.dtype}; the kernels take float32, float16 or bfloat16"
    if x.dim() == 0 or x.shape[-1] == 0:
        return f"x of shape {tuple(x.shape)} has no last dimension to normalise"
    cols = x.shape[-1]
    if cols > MAX_COLS:
        return f"last dimension {cols} is larger than {MAX_COLS}"
    if residual is not None:
        if residual.shape != x.shape or residual.dtype not in DTYPES:
            return (
                f"residual {tuple(residual.shape)} {residual.dtype} does not match "
                f"x {tuple(x.shape)} (float32, float16 or bfloat16)"
            )
        if residual.device != x.device:
            return f"residual is on {residual.device} but x is on {x.device}"
    s_dtype, y_dtype = norm_dtypes(x, residual)
    if not dtypes_supported(x.dtype, s_dtype, y_dtype):
        return (
            f"no kernel for x {x.dtype} with sum {s_dtype} and output {y_dtype} (a branch in "
            "one half dtype under autocast to the other)"
        )
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if p.shape != (cols,):
            return f"{name} has shape {tuple(p.shape)}; expected ({cols},)"
        if p.dtype not in DTYPES:
            return f"{name} has dtype {p.dtype}; the kernels take float32, float16 or bfloat16"
        if p.device != x.device:
            return f"{name} is on {p.device} but x is on {x.device}"
    return None


# The extension's two calls as torch custom ops: torch.compile sees opaque ops with known output
# shapes and dtypes (the fake implementations below) instead of breaking the graph at every norm.
# Outputs the binding returns as None (no sum without a residual, no mean for RMSNorm, gradients
# not asked for) are empty tensors here.


@torch.library.custom_op("craft::norm_fwd", mutates_args=())
def norm_fwd_op(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],  # noqa: UP045 (custom_op reads the annotations)
    weight: Optional[torch.Tensor],  # noqa: UP045
    bias: Optional[torch.Tensor],  # noqa: UP045
    rms: bool,
    eps: float,
    y_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[y (N, C) y_dtype, sum (N, C) or empty, mean (N,) or empty, rstd (N,)] of x (N, C)."""
    y, s, mean, rstd = extension().norm_fwd(x, residual, weight, bias, rms, eps, y_dtype)
    return y, x.new_empty(0) if s is None else s, x.new_empty(0) if mean is None else mean, rstd


@norm_fwd_op.register_fake
def _norm_fwd_fake(x, residual, weight, bias, rms, eps, y_dtype):  # type: ignore[no-untyped-def]
    rows = x.shape[0]
    s = x.new_empty(0) if residual is None else torch.empty_like(x, dtype=residual.dtype)
    mean = x.new_empty(0) if rms else x.new_empty(rows, dtype=torch.float32)
    return torch.empty_like(x, dtype=y_dtype), s, mean, x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("craft::norm_bwd", mutates_args=())
def norm_bwd_op(
    dy: torch.Tensor,
    dsum: Optional[torch.Tensor],  # noqa: UP045
    x: torch.Tensor,
    mean: Optional[torch.Tensor],  # noqa: UP045
    rstd: torch.Tensor,
    weight: Optional[torch.Tensor],  # noqa: UP045
    need_dweight: bool,
    need_dbias: bool,
    rms: bool,
    branch_dtype: Optional[torch.dtype],  # noqa: UP045
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[dx (x's dtype), dweight fp32 or empty, dbias fp32 or empty, dx_branch or empty]."""
    dx, dw, db, dxb = extension().norm_bwd(
        dy, dsum, x, mean, rstd, weight, need_dweight, need_dbias, rms, branch_dtype
    )

    def given(t: torch.Tensor | None) -> torch.Tensor:
        return dy.new_empty(0) if t is None else t  # a fresh empty tensor each: no aliases

    return dx, given(dw), given(db), given(dxb)


@norm_bwd_op.register_fake
def _norm_bwd_fake(dy, dsum, x, mean, rstd, weight, need_dweight, need_dbias, rms, branch_dtype):  # type: ignore[no-untyped-def]
    cols = x.shape[-1]
    dw = x.new_empty(cols, dtype=torch.float32) if need_dweight else dy.new_empty(0)
    db = x.new_empty(cols, dtype=torch.float32) if need_dbias else dy.new_empty(0)
    branch = branch_dtype is not None and branch_dtype != x.dtype
    dxb = torch.empty_like(x, dtype=branch_dtype) if branch else dy.new_empty(0)
    return torch.empty_like(x), dw, db, dxb


class FusedNorm(torch.autograd.Function):
    """y = norm(x [+ residual]) with the compiled kernels; also returns s = x + residual if given.

    `y_dtype` is the output dtype the contract asks for (autocast's, or s's); the residual arrives
    in s's dtype (the caller casts a narrower one, whose gradient is cast back in `backward`).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        residual: torch.Tensor | None,
        rms: bool,
        eps: float,
        y_dtype: torch.dtype,
    ) -> Any:
        shape = x.shape
        cols = shape[-1]
        x2 = x.reshape(-1, cols).contiguous()  # (N, C)
        r2 = None if residual is None else residual.reshape(-1, cols).contiguous()  # (N, C)
        # y (N, C) in y_dtype; s (N, C) in the residual's dtype
        y, s, mean, rstd = norm_fwd_op(x2, r2, weight, bias, rms, eps, y_dtype)
        s = None if residual is None else s
        # The backward needs the normalised input: the sum when a residual was fused.
        ctx.save_for_backward(x2 if s is None else s, None if rms else mean, rstd, weight)
        ctx.rms = rms
        ctx.shape = shape
        # the branch's gradient dtype when it differs from the sum's (written by the kernel)
        ctx.branch_dtype = x.dtype if s is not None and s.dtype != x.dtype else None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.set_materialize_grads(False)
        if s is None:
            return y.view(shape)
        return y.view(shape), s.view(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor | None, ds: torch.Tensor | None = None) -> Any:
        inp, mean, rstd, weight = ctx.saved_tensors
        cols = inp.shape[-1]
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        if dy is None:  # only the returned sum was used: its gradient passes straight through
            dx = None if ds is None or not need_x else ds.to(ctx.branch_dtype or ds.dtype)
            return dx, None, None, (ds if need_r else None), None, None, None
        dy2 = dy.reshape(-1, cols).contiguous()  # (N, C)
        ds2 = None if ds is None else ds.reshape(-1, cols).contiguous()  # (N, C)
        need_w = need_w and weight is not None
        need_b = need_b and ctx.bias_dtype is not None
        dx, dw, db, dx_branch = norm_bwd_op(
            dy2, ds2, inp, mean, rstd, weight, need_w, need_b, ctx.rms, ctx.branch_dtype
        )
        dx = dx.view(ctx.shape)  # in s's dtype: the residual's gradient
        grad_x = dx if ctx.branch_dtype is None else dx_branch.view(ctx.shape)
        dw = dw.to(weight.dtype) if need_w else None
        db = db.to(ctx.bias_dtype) if need_b else None
        return (grad_x if need_x else None), dw, db, (dx if need_r else None), None, None, None


def norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    kind: str = "layernorm",
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm/RMSNorm over the last dim; with `residual`, (norm(x + residual), x + residual)."""
    check_norm(kind, bias)
    reason = supports(x, weight, bias, kind, residual)
    if reason is not None:
        raise KernelError(f"the cuda norm kernels cannot run these inputs: {reason}")
    s_dtype, y_dtype = norm_dtypes(x, residual)
    if residual is not None and residual.dtype != s_dtype:
        residual = residual.to(s_dtype)  # e.g. a bf16 residual under an fp32 branch; rare
    return FusedNorm.apply(x, weight, bias, residual, kind == "rmsnorm", float(eps), y_dtype)


register_backend(
    "norm",
    "cuda",
    norm,
    priority=20,
    devices=("cuda",),
    available=available,
    supports=supports,
)
