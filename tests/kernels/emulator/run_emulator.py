"""Build and run the CPU emulation of the CUDA norm kernels (see norm_emulator.cpp).

The kernel sources are copied with their launches (`k<<<grid, block, smem, stream>>>(args)`) and
`extern __shared__` arrays rewritten for the emulator, compiled with the host C++ compiler against
the CUDA headers, and run. Used by .ci/compile_cuda; exit status 0 when every case matches.

    python tests/kernels/emulator/run_emulator.py [--cuda-include DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNELS = HERE.parents[2] / "kernels"
SOURCES = ("norm_fwd.cu", "norm_bwd.cu")
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\((.*?)\);", re.S)
DYN_SMEM = re.compile(r"extern\s+__shared__\s+float\s+(\w+)\[\];")


def rewrite(source: str) -> str:
    """Kernel source with launches and dynamic shared memory turned into emulator calls."""
    out, n = LAUNCH.subn(r"emu::launch(\1, \2, \3);", source)
    if n == 0:
        raise ValueError("no kernel launch found to rewrite")
    return DYN_SMEM.sub(r"float* \1 = emu::dyn_smem();", out)


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include directory (next to nvcc, or under CUDA_HOME)."""
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parents[1] / "include")
    candidates.append(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include")
    return next((c for c in candidates if (c / "cuda_runtime.h").is_file()), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda-include", type=Path, default=None)
    args = parser.parse_args(argv)
    include = args.cuda_include or cuda_include_dir()
    cxx = os.environ.get("CXX", "g++")
    if include is None or shutil.which(cxx) is None:
        print("emulator: no CUDA headers or C++ compiler; skipping the kernel emulation")
        return 0
    with tempfile.TemporaryDirectory(prefix="craft_emu_") as tmp:
        work = Path(tmp)
        for name in SOURCES:
            text = rewrite((KERNELS / name).read_text())
            (work / name.replace(".cu", "_emu.cu")).write_text(text)
        binary = work / "norm_emulator"
        start = time.perf_counter()
        cmd = [cxx, "-std=c++20", "-O1", "-w", f"-I{work}", f"-I{KERNELS}", "-isystem",
               str(include), str(HERE / "norm_emulator.cpp"), "-o", str(binary)]  # fmt: skip
        build = subprocess.run(cmd, capture_output=True, text=True)
        if build.returncode != 0:
            print(build.stdout + build.stderr)
            print("emulator: build FAILED")
            return 1
        print(f"emulator: built in {time.perf_counter() - start:.0f} s")
        start = time.perf_counter()
        run = subprocess.run([str(binary)], capture_output=True, text=True)
        print(run.stdout + run.stderr, end="")
        print(f"emulator: ran in {time.perf_counter() - start:.0f} s")
        return 0 if run.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
