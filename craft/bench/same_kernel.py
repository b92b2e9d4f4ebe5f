"""Implementations that run the very kernel a baseline runs, so their ratio is noise, not speed.

Craft's `torch` backend calls PyTorch's own functions (SDPA, `F.cross_entropy`, `F.layer_norm` /
`F.rms_norm`), which are also the families' baselines. Timing one against the other measures the
machine's noise; tables say "same kernel" for such pairs and summaries claim no speed-up from
them. No torch import: the README summary uses this on recorded JSON.
"""

from __future__ import annotations

from fnmatch import fnmatch

# family -> Craft implementation -> (baseline patterns it shares a kernel with, dtypes or None:
# every dtype)
_SAME: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...] | None]]] = {
    # SDPA without a forced backend runs flash attention whenever flash accepts the inputs.
    "attention": {"craft.torch": (("sdpa.flash",), None)},
    # Craft upcasts the logits to float32 first: the same call only when they already are.
    "cross_entropy": {"craft.torch": (("torch",), ("float32",))},
    "norm": {"craft.torch": (("torch",), None)},
}


def same_kernel(family: str, impl: str, baseline: str | None, dtype: str | None = None) -> bool:
    """Whether `impl` runs the kernel `baseline` runs (for inputs of `dtype`, e.g. "float32")."""
    entry = _SAME.get(family, {}).get(impl)
    if entry is None or baseline is None:
        return False
    patterns, dtypes = entry
    if dtypes is not None and dtype not in dtypes:
        return False
    return any(fnmatch(baseline, p) for p in patterns)
