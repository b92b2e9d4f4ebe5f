"""Low-precision arithmetic the loss backends share: fp32-accumulating GEMMs and fp32 scaling.

Two traps of fp16/bf16 gradients that these helpers avoid:

- Scaling a half tensor by a scale converted to its dtype (`g.mul_(scale.to(g.dtype))`) turns a
  GradScaler scale of 65536 into inf in fp16; without the conversion, whether a 0-d float32 scale
  is applied in float32 depends on the device (CUDA promotes it to the tensor's dtype). `scale_`
  multiplies in float32 and rounds the product once.
- Accumulating chunk products in a low-precision GEMM output rounds every partial sum.
  `addmm_fp32_` keeps the fp16/bf16 operands (tensor cores) and accumulates into a float32 tensor.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("craft.ops")
_FP32_OUT_GEMM: dict[str, bool] = {}  # device type -> whether torch has the out_dtype GEMM there


def scale_(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """t *= s in place, computed in float32 (float64 stays float64) and rounded once to t's dtype.

    `s` is a 0-d tensor (e.g. grad_output / N) that stays on the device: no host sync.
    """
    if t.dtype in (torch.float32, torch.float64):
        return t.mul_(s.to(t.dtype))
    return t.copy_(t.float().mul_(s.float()))


def scaled(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """t * s as a new tensor of t's dtype, computed in float32 (float64 stays) and rounded once."""
    if t.dtype in (torch.float32, torch.float64):
        return t * s.to(t.dtype)
    return (t.float() * s.float()).to(t.dtype)


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc += a @ b, with acc float32 and a, b in float32 or one low-precision dtype.

    On CUDA the low-precision case is one tensor-core GEMM that reads fp16/bf16 and accumulates
    into acc in float32 (torch's out_dtype GEMM). Where torch has no such GEMM (CPU, older
    versions) the operands are widened to float32 first, which gives the same products; the log
    says so once per device type.
    """
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        return acc.addmm_(a, b)
    dev = acc.device.type
    # (torch.compile's fake tensors have no correct rule for the out_dtype GEMM: widen there)
    if dev == "cuda" and _FP32_OUT_GEMM.get(dev, True) and not torch.compiler.is_compiling():
        try:
            out = acc.unsqueeze(0)  # (1, M, N) view: baddbmm accumulates into it in place
            torch.baddbmm(out, a.unsqueeze(0), b.unsqueeze(0), out_dtype=acc.dtype, out=out)
            _FP32_OUT_GEMM[dev] = True
            return acc
        except (RuntimeError, TypeError, NotImplementedError) as e:
            _FP32_OUT_GEMM[dev] = False
            log.info(
                "this torch has no %s GEMM with float32 accumulation (%s); low-precision "
                "gradient GEMMs widen their operands to float32 instead (slower)",
                a.dtype,
                str(e).splitlines()[0] if str(e) else type(e).__name__,
            )
    return acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def fp32_out_gemm(device_type: str) -> bool | None:
    """Whether the fp32-accumulating low-precision GEMM ran on `device_type` (None: not tried)."""
    return _FP32_OUT_GEMM.get(device_type)
