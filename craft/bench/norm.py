"""LayerNorm / RMSNorm benchmark over x (N, C), N = batch * seq_len, optionally fused with a
residual add (s = x + residual; returns norm(s) and s).

Memory-bound: GB/s over the nominal bytes (s = bytes per element, weights ignored): forward reads
x and writes y, 2 * N * C * s (4 * N * C * s with the residual: also reads it and writes s);
backward reads dy and x and writes dx, 3 * N * C * s (4 with the residual: also reads ds);
forward+backward is the sum.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from craft.bench.core import Case, Family, Impl, Inputs, Settings, register_impl
from craft.bench.impls import compile_impl, liger_available, register_craft_backends

NAME = "norm"
EPS = 1e-5
KINDS = ("layernorm", "rmsnorm")
# (batch, seq_lens, hidden, kinds) defaults
_DEFAULTS = {
    "cuda": ([4], [4096], [1024, 2048, 4096, 8192], ["layernorm", "rmsnorm"]),
    "cpu": ([2], [256], [256, 1024, 4096], ["layernorm", "rmsnorm"]),
    "quick": ([1], [32], [64, 256], ["layernorm"]),
}


def cases(s: Settings) -> list[dict[str, Any]]:
    key = "quick" if s.quick else ("cuda" if s.device.type == "cuda" else "cpu")
    d_batch, d_seq, d_hidden, d_kinds = _DEFAULTS[key]
    return [
        {"batch": b, "seq_len": t, "rows": b * t, "hidden": c, "kind": k, "residual": s.residual}
        for k, b, t, c in itertools.product(
            s.pick("norm_kinds", d_kinds),
            s.pick("batch", d_batch),
            s.pick("seq_lens", d_seq),
            s.pick("hidden", d_hidden),
        )
    ]


def make_inputs(case: Case, gen: torch.Generator) -> Inputs:
    d = case.dims
    n, c = d["rows"], d["hidden"]

    def randn(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=case.device) * scale + shift).to(
            case.dtype
        )

    x = randn(n, c)  # (N, C)
    weight = randn(c, scale=0.1, shift=1.0)  # (C,)
    bias = randn(c, scale=0.1) if d["kind"] == "layernorm" else None  # (C,)
    residual = randn(n, c) if d["residual"] else None  # (N, C)
    args = (x, weight, bias, residual)
    diff = tuple(i for i, a in enumerate(args) if a is not None)
    grad_out: tuple[torch.Tensor, ...] = (randn(n, c),)
    outs: tuple[str, ...] = ("y",)
    if d["residual"]:
        grad_out, outs = (grad_out[0], randn(n, c)), ("y", "s")
    return Inputs(args, ("x", "weight", "bias", "residual"), diff, grad_out, outs)


def _math(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kind: str
) -> torch.Tensor:
    if kind == "layernorm":
        mean = x.mean(dim=-1, keepdim=True)
        y = (x - mean) * torch.rsqrt((x - mean).square().mean(dim=-1, keepdim=True) + EPS)
    else:
        y = x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + EPS)
    y = y * weight
    return y + bias if bias is not None else y


def reference(case: Case, inputs: Inputs, dtype: torch.dtype) -> list[torch.Tensor]:
    x, weight, bias, residual = (
        None if a is None else a.detach().to(dtype).requires_grad_(case.needs_grad)
        for a in inputs.args
    )
    with torch.set_grad_enabled(case.needs_grad):
        s = x + residual if residual is not None else x
        outs = [_math(s, weight, bias, case.dims["kind"])]  # (N, C)
        if residual is not None:
            outs.append(s)
        if case.needs_grad:
            grads = [g.to(dtype) for g in inputs.grad_out if g is not None]
            torch.autograd.backward(outs, grads)
    ref = [o.detach() for o in outs]
    if case.needs_grad:
        ref += [a.grad for a in (x, weight, bias, residual) if a is not None]
    return ref


def work(case: Case) -> float:
    d = case.dims
    res = 1 if d["residual"] else 0
    per_elem = {"fwd": 2 + 2 * res, "bwd": 3 + res, "fwd+bwd": 5 + 3 * res}[case.mode]
    return float(per_elem * d["rows"] * d["hidden"] * (torch.finfo(case.dtype).bits // 8))


def memory(case: Case) -> int:
    """x (and the residual), drawn in float32 then cast, and the float64 reference outputs."""
    n, c = case.dims["rows"], case.dims["hidden"]
    elem = torch.finfo(case.dtype).bits // 8
    tensors = 2 if case.dims["residual"] else 1
    return n * c * tensors * (4 + elem + 8 * (2 if case.needs_grad else 1))


FAMILY = Family(
    name=NAME,
    title="Norm",
    x_key="hidden",
    metric="GB/s",
    cases=cases,
    make_inputs=make_inputs,
    reference=reference,
    work=work,
    baselines=("torch", "eager"),
    label_keys=("rows", "hidden", "kind", "residual"),
    work_note=(
        "bytes: fwd 2*N*C*s (4 with residual); bwd 3*N*C*s (4 with residual); fwd+bwd the sum"
    ),
    memory=memory,
)


# ---------------------------------------------------------------------------- implementations

NormFn = Callable[..., Any]


def _with_residual(norm: Callable[[torch.Tensor], torch.Tensor]) -> NormFn:
    """fn(x, weight, bias, residual) from a plain norm of one tensor."""

    def fn(x: torch.Tensor, residual: torch.Tensor | None) -> Any:
        if residual is None:
            return norm(x)
        s = x + residual
        return norm(s), s

    return fn


def _eager(case: Case) -> NormFn:
    """The norm written out, statistics in float32."""
    kind = case.dims["kind"]

    def fn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: Any) -> Any:
        return _with_residual(lambda s: _math(s.float(), weight, bias, kind).to(s.dtype))(
            x, residual
        )

    return fn


def _torch(case: Case) -> NormFn:
    """F.layer_norm / F.rms_norm (the residual add is a separate kernel)."""
    kind = case.dims["kind"]

    def fn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: Any) -> Any:
        c = x.shape[-1]
        if kind == "layernorm":
            return _with_residual(lambda s: F.layer_norm(s, (c,), weight, bias, EPS))(x, residual)
        return _with_residual(lambda s: F.rms_norm(s, (c,), weight, EPS))(x, residual)

    return fn


def _liger(case: Case) -> NormFn:
    from torch.func import functional_call

    c, kind = case.dims["hidden"], case.dims["kind"]
    if kind == "layernorm":
        from liger_kernel.transformers import LigerLayerNorm

        module: torch.nn.Module = LigerLayerNorm(c, eps=EPS, bias=True)
    else:
        from liger_kernel.transformers import LigerRMSNorm

        module = LigerRMSNorm(c, eps=EPS, in_place=False)
    module = module.to(case.device, case.dtype)

    def fn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: Any) -> Any:
        params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
        return _with_residual(lambda s: functional_call(module, params, (s,)))(x, residual)

    return fn


def _liger_available(case: Case, args: tuple[Any, ...]) -> str | None:
    return liger_available(case)


def _craft_call(fn: Callable[..., Any], case: Case) -> NormFn:
    kind = case.dims["kind"]
    return lambda x, weight, bias, residual: fn(x, weight, bias, kind, EPS, residual)


def _register() -> None:
    register_impl(NAME, Impl("eager", _eager, description="written out, float32 statistics"))
    register_impl(NAME, Impl("torch", _torch, description="F.layer_norm / F.rms_norm"))
    compile_impl(NAME, _eager)
    register_impl(NAME, Impl("liger", _liger, _liger_available, "Liger-Kernel LayerNorm/RMSNorm"))
    register_craft_backends(
        NAME, "norm", _craft_call, lambda case, a: (a[0], a[1], a[2], case.dims["kind"], a[3])
    )


_register()
