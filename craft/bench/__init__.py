"""`craft bench`: kernel and training benchmarks that check correctness before they time.

Kernel families (attention, cross_entropy, linear_cross_entropy, norm) compare Craft's backends
with PyTorch's own paths, torch.compile and Liger-Kernel in one run. Add an implementation with
`register_impl(family, Impl(name, make, available))`; it is checked against the float64
reference like the built-ins, and flagged instead of timed when its result is wrong.

Names are loaded on first use, so `craft.bench.config` stays importable without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "craft.bench.core": (
        "DTYPES",
        "FAILED",
        "FAMILY_MODULES",
        "MODES",
        "OK",
        "SKIPPED",
        "WRONG",
        "Case",
        "Family",
        "FamilyReport",
        "Impl",
        "Inputs",
        "Result",
        "Settings",
        "family",
        "impls",
        "register_impl",
        "run_family",
        "unregister_impl",
    ),
    "craft.bench.hardware": ("machine_info", "peak_for"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'craft.bench' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
