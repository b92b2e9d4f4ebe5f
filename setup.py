"""Packaging: the pure-Python package plus the optional CUDA extension `craft._C` (from kernels/).

The metadata lives in pyproject.toml; this file only decides about the extension:

- `CRAFT_BUILD_CUDA=0`: never build it; the install is pure Python.
- `CRAFT_BUILD_CUDA=1`: build it, and fail the install when that is not possible.
- unset: build it when torch with CUDA and a CUDA toolkit are there, otherwise skip it with a
  message; a failed build is reported and skipped, so the install never fails.

pip builds in an isolated environment that has no torch, so the extension is skipped there. To
build it against the installed torch: `pip install --no-build-isolation .` (or `-e .`).
`TORCH_CUDA_ARCH_LIST` picks the GPU architectures (default "8.0;9.0": A100, H100).
Without the extension, `craft.ops` compiles the same sources on first use on a CUDA machine.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
KERNEL_DIR = "kernels"
# Kept in step with craft/ops/cuda.py (SOURCES, NVCC_FLAGS, CXX_FLAGS).
SOURCES = ("norm_fwd.cu", "norm_bwd.cu", "norm_binding.cpp")
KERNEL_SUFFIXES = (".cu", ".cuh", ".h", ".cpp")
RECIPE_DIRS = ("recipes", "configs")  # shipped as craft/_recipes/ so recipes can be named
NVCC_FLAGS = ["-O3", "-lineinfo"]
CXX_FLAGS = ["-O3"]
DEFAULT_ARCH_LIST = "8.0;9.0"
EXTENSION = "craft._C"
ISOLATION_HINT = "use `pip install --no-build-isolation .` to build against the installed torch"


class CudaBuildError(RuntimeError):
    """CRAFT_BUILD_CUDA=1 but the extension cannot be built."""


def build_mode(env: Mapping[str, str] = os.environ) -> str:
    """'off', 'required' or 'auto' from CRAFT_BUILD_CUDA."""
    value = env.get("CRAFT_BUILD_CUDA", "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("0", "false", "no", "off"):
        return "off"
    if value in ("1", "true", "yes", "on"):
        return "required"
    raise CudaBuildError(f"CRAFT_BUILD_CUDA={value!r}: expected 0, 1 or unset")


def cuda_build_blocker() -> str | None:
    """None when torch with CUDA and a CUDA toolkit are importable here, else what is missing."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError as e:
        return f"torch is not importable in the build environment ({e}); {ISOLATION_HINT}"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    missing = [s for s in SOURCES if not (ROOT / KERNEL_DIR / s).is_file()]
    if missing:
        return f"kernel sources missing: {', '.join(missing)}"
    return None


def plan_extension(env: Mapping[str, str] = os.environ) -> tuple[bool, str]:
    """(build it?, why not / which mode). Raises CudaBuildError when required but impossible."""
    mode = build_mode(env)
    if mode == "off":
        return False, "CRAFT_BUILD_CUDA=0"
    blocker = cuda_build_blocker()
    if blocker is None:
        return True, mode
    if mode == "required":
        raise CudaBuildError(f"CRAFT_BUILD_CUDA=1 but {EXTENSION} cannot be built: {blocker}")
    return False, blocker


class BuildPyWithKernels(build_py):
    """Ships the kernel sources (craft/_kernels/, for the just-in-time build) and the recipes with
    their configs (craft/_recipes/, so `craft train char_small` works from any directory) in wheels."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads kernels/, recipes/ and configs/ in the checkout
        dest = Path(self.build_lib) / "craft" / "_kernels"
        dest.mkdir(parents=True, exist_ok=True)
        for src in sorted((ROOT / KERNEL_DIR).iterdir()):
            if src.suffix in KERNEL_SUFFIXES:
                shutil.copy2(src, dest / src.name)
        for name in RECIPE_DIRS:  # recipes include "../configs/...", so both keep their layout
            shutil.copytree(
                ROOT / name,
                Path(self.build_lib) / "craft" / "_recipes" / name,
                dirs_exist_ok=True,
                ignore=shutil.ignore_patterns("__pycache__", ".*"),
            )


def _extension_setup(required: bool) -> dict[str, Any]:
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)

    class OptionalBuildExtension(BuildExtension):
        """Builds craft._C; unless CRAFT_BUILD_CUDA=1, a failure is reported and skipped."""

        def build_extensions(self) -> None:
            try:
                super().build_extensions()
            except Exception as e:
                if required:
                    raise
                print(
                    f"craft: building {EXTENSION} failed, installing without it "
                    f"(CRAFT_BUILD_CUDA=1 makes this an error): {e}",
                    file=sys.stderr,
                )
                self.extensions = []

    ext = CUDAExtension(
        EXTENSION,
        sources=[f"{KERNEL_DIR}/{s}" for s in SOURCES],
        include_dirs=[str(ROOT / KERNEL_DIR)],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
    )
    return {
        "ext_modules": [ext],
        "cmdclass": {"build_ext": OptionalBuildExtension, "build_py": BuildPyWithKernels},
    }


def main() -> None:
    try:
        build, detail = plan_extension()
    except CudaBuildError as e:
        sys.exit(f"error: {e}")
    if build:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        print(f"craft: building {EXTENSION} for CUDA archs {arch}", file=sys.stderr)
        setup(**_extension_setup(required=detail == "required"))
    else:
        print(f"craft: pure-Python install, skipping {EXTENSION}: {detail}", file=sys.stderr)
        setup(cmdclass={"build_py": BuildPyWithKernels})


if __name__ == "__main__":
    main()
