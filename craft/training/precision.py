"""`training.precision = "auto"`: bf16 autocast where the hardware runs it faster, fp32 otherwise.

The rule (`resolve_precision`); `bench/precision_auto.py` measures its basis (step time in fp32
and bf16 over a sweep of widths, into `bench/results/precision_auto.md`):
- CUDA with bf16 support (Ampere and newer): bf16. Tensor cores run bf16 at several times the
  fp32 rate and autocast keeps the weights and the optimizer in fp32.
- A CPU with native bf16 arithmetic (AMX-BF16 or AVX512-BF16 in /proc/cpuinfo) and a model at
  least `CPU_BF16_MIN_WIDTH` wide: bf16. Narrower models spend their step in per-op overhead and
  casts, where bf16 only adds work. The threshold lies between the two points measured on an
  AMX-BF16 CPU so far (width 128: bf16 slower than fp32; width 384, char_gpt: a step in 2.9 s
  instead of 5.8 s); `bench/precision_auto.py` on such a CPU prints the width from which bf16
  pays, to set it from a full sweep.
- Anything else (a CPU that emulates bf16 through fp32 conversions, MPS, narrow models): fp32.
  On such CPUs every bf16 matmul converts its inputs to fp32 and back, so autocast only adds
  work.

Explicit values never change: `fp32` (or `no`), `bf16` and `fp16` mean exactly what they say.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# CPU flags (Linux /proc/cpuinfo names) of native bf16 arithmetic.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# The narrowest model (n_embd) for which bf16 autocast pays on a CPU with native bf16.
CPU_BF16_MIN_WIDTH = 256


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_bf16_features(flags: frozenset[str] | None = None) -> list[str]:
    """The native-bf16 features of this CPU (e.g. ["amx_bf16"]), empty when it has none."""
    have = cpu_flags() if flags is None else flags
    return [f for f in CPU_BF16_FLAGS if f in have]


@dataclass(frozen=True)
class PrecisionChoice:
    """What `auto` resolved to, and why (logged once and written into the resolved config)."""

    precision: str  # "no" (fp32) or "bf16"
    reason: str

    @property
    def label(self) -> str:
        return "fp32" if self.precision == "no" else self.precision


def resolve_precision(
    device_type: str,
    width: int | None,
    *,
    cuda_bf16: bool = False,
    flags: frozenset[str] | None = None,
) -> PrecisionChoice:
    """The precision `auto` means for a model `width` wide (n_embd; None: unknown) on a device.

    `cuda_bf16`: whether the CUDA device supports bf16 (`torch.cuda.is_bf16_supported()`);
    `flags`: the CPU's flags (default: read from /proc/cpuinfo).
    """
    if device_type == "cuda":
        if cuda_bf16:
            return PrecisionChoice("bf16", "CUDA device with bf16 support")
        return PrecisionChoice("no", "CUDA device without bf16 support (fp16 is opt-in)")
    if device_type != "cpu":
        return PrecisionChoice("no", f"bf16 autocast is not measured on {device_type}")
    native = cpu_bf16_features(flags)
    cpu = platform.machine() or "this CPU"
    if not native:
        return PrecisionChoice(
            "no",
            f"{cpu} CPU without native bf16 (no {' / '.join(CPU_BF16_FLAGS)}): "
            "bf16 autocast is slower than fp32 there",
        )
    if width is None or width < CPU_BF16_MIN_WIDTH:
        return PrecisionChoice(
            "no",
            f"CPU with {', '.join(native)} but model width {width} < {CPU_BF16_MIN_WIDTH}: "
            "too narrow for bf16 to pay",
        )
    return PrecisionChoice(
        "bf16", f"CPU with {', '.join(native)} and model width {width} >= {CPU_BF16_MIN_WIDTH}"
    )


def accelerate_precision(precision: str) -> str:
    """Accelerate's `mixed_precision` for an explicit `training.precision` ("fp32" is "no")."""
    return "no" if precision in ("no", "fp32") else precision


def _device_type(cfg: Any) -> str:
    """The device type the run will train on (what Accelerate will pick)."""
    import torch

    from craft.training.runtime import has_accelerator

    if cfg.run.cpu or not has_accelerator():
        return "cpu"
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "current_accelerator"):
        dev = acc.current_accelerator()
        if dev is not None:
            return dev.type
    return "cuda" if torch.cuda.is_available() else "cpu"


def apply_auto_precision(cfg: Any) -> tuple[Any, PrecisionChoice | None]:
    """`cfg` with `training.precision = "auto"` replaced by its choice and the reason recorded in
    `training.precision_auto`; an explicit precision is returned unchanged (and None)."""
    if cfg.training.precision != "auto":
        return cfg, None
    import torch

    device_type = _device_type(cfg)
    cuda_bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported()
    width = getattr(cfg.model, "d_model", None)
    choice = resolve_precision(device_type, width, cuda_bf16=cuda_bf16)
    training = cfg.training.model_copy(
        update={"precision": choice.precision, "precision_auto": choice.reason}
    )
    return cfg.model_copy(update={"training": training}), choice
