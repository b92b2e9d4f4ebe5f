"""`craft bench`: kernel and training benchmarks that check correctness before they time.

Kernel families (attention, cross_entropy, linear_cross_entropy, norm) compare Craft's backends
with PyTorch's own paths, torch.compile and Liger-Kernel in one run. Add an implementation with
`register_impl(family, Impl(name, make, available))`; it is checked against the float64
reference like the built-ins, and flagged instead of timed when its result is wrong.
"""

from __future__ import annotations

from craft.bench.core import (
    DTYPES,
    FAILED,
    FAMILY_MODULES,
    MODES,
    OK,
    SKIPPED,
    WRONG,
    Case,
    Family,
    FamilyReport,
    Impl,
    Inputs,
    Result,
    Settings,
    family,
    impls,
    register_impl,
    run_family,
    unregister_impl,
)
from craft.bench.hardware import machine_info, peak_for

__all__ = [
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
    "machine_info",
    "peak_for",
    "register_impl",
    "run_family",
    "unregister_impl",
]
