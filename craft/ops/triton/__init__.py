"""The `triton` backend: fused Triton kernels for attention, cross_entropy and linear_cross_entropy.

It runs on CUDA (priority 30, so `auto` prefers it there). Under the Triton interpreter
(TRITON_INTERPRET=1) it also runs on CPU tensors, which is how the test suite checks the kernels
without a GPU; interpreted kernels are slow, so on CPU it is used only when selected explicitly
(`kernels.attention = "triton"`), never by `auto`. Interpreted ops are not traced by
torch.compile (they run between compiled graphs); compiled Triton kernels on CUDA are.
"""

from __future__ import annotations

from typing import Any

import torch

from craft.ops.registry import register_backend

try:
    import triton  # noqa: F401

    _IMPORT_ERROR: str | None = None
except Exception as e:  # ImportError, or a broken install raising at import time
    _IMPORT_ERROR = f"triton does not import ({type(e).__name__}: {e})"

if _IMPORT_ERROR is None:
    from craft.ops.triton import attention as _attention
    from craft.ops.triton import cross_entropy as _cross_entropy
    from craft.ops.triton import linear_cross_entropy as _linear_cross_entropy
    from craft.ops.triton._common import INTERPRET
else:
    INTERPRET = False

PRIORITY = 30
DEVICES: tuple[str, ...] = ("cuda", "cpu") if INTERPRET else ("cuda",)


def available() -> str | None:
    """None when the kernels can run here, else why not."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if INTERPRET:
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels interpreted on CPU)"
    return None


def _supports_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, *_: Any
) -> str | None:
    return _attention.check_inputs(q, k, v, causal)


def _supports_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *_: Any) -> str | None:
    return _cross_entropy.check_inputs(logits, targets)


def _supports_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *_: Any
) -> str | None:
    return _linear_cross_entropy.check_inputs(hidden, weight, targets)


def _unavailable(op: str) -> Any:
    def fn(*_: Any, **__: Any) -> Any:
        from craft.errors import KernelError

        raise KernelError(f"kernels.{op} = 'triton' cannot run: {_IMPORT_ERROR}")

    return fn


if _IMPORT_ERROR is None:
    _FNS: dict[str, Any] = {
        "attention": (_attention.attention, _supports_attention),
        "cross_entropy": (_cross_entropy.cross_entropy, _supports_cross_entropy),
        "linear_cross_entropy": (
            _linear_cross_entropy.linear_cross_entropy,
            _supports_linear_cross_entropy,
        ),
    }
else:
    _FNS = {
        op: (_unavailable(op), None)
        for op in ("attention", "cross_entropy", "linear_cross_entropy")
    }

if INTERPRET:
    # torch.compile cannot trace the interpreter's numpy code as it traces a compiled Triton
    # kernel: interpreted ops run eagerly between compiled graphs (a graph break).
    _FNS = {op: (torch.compiler.disable(fn), sup) for op, (fn, sup) in _FNS.items()}

for _op, (_fn, _supports) in _FNS.items():
    register_backend(
        _op,
        "triton",
        _fn,
        priority=PRIORITY,
        devices=DEVICES,
        auto_devices=("cuda",),
        available=available,
        supports=_supports,
    )
