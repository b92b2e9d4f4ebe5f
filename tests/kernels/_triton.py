"""Shared pieces of the Triton kernel tests: where they run, tolerances, the GPU grid switch.

On a machine without CUDA the kernels run in the Triton interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET=1); with CUDA they are compiled and run on the GPU. CRAFT_GPU_GRID=1 adds
the large CUDA-only grid (long sequences, real vocabularies) that bench/gpu_check.sh runs.
"""

from __future__ import annotations

import os

import pytest
import torch

from craft.ops.triton._common import INTERPRET

DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
GPU_GRID = os.environ.get("CRAFT_GPU_GRID") == "1" and DEVICE == "cuda"

needs_triton = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRET,
    reason="no CUDA device and TRITON_INTERPRET is not set",
)
gpu_grid = pytest.mark.skipif(
    not GPU_GRID, reason="large CUDA grid: set CRAFT_GPU_GRID=1 on a machine with a GPU"
)

# (dtype, atol, rtol) of a kernel result against the float64 reference of the same inputs.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (2e-4, 2e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (6e-2, 3e-2),
}


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str
) -> None:
    """Compare a kernel output with its float64 reference under the tolerance of `dtype`."""
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )
