"""The machine a benchmark ran on, and the peak numbers of known accelerators.

`machine_info` is what every recorded result says about where it came from; `peak_for` is the one
table of peaks (MFU and the share of memory bandwidth are computed against it).

Peaks are the vendors' dense (no sparsity) bf16 tensor-core FLOP/s and HBM bandwidth. MFU is
achieved model FLOP/s divided by the bf16 peak, whatever precision the run used, so MFU numbers
are comparable across runs.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch

from craft.training.precision import cpu_bf16_features


@dataclass(frozen=True)
class Peak:
    bf16_flops: float  # dense bf16 FLOP/s
    bandwidth: float  # bytes/s of device memory


# Matched against torch.cuda.get_device_name() in order: the first pattern found wins.
_PEAKS: tuple[tuple[tuple[str, ...], Peak], ...] = (
    (("H200",), Peak(989.4e12, 4.8e12)),
    (("H100", "NVL"), Peak(835.0e12, 3.9e12)),
    (("H100", "PCIE"), Peak(756.0e12, 2.0e12)),
    (("H100",), Peak(989.4e12, 3.35e12)),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    (("A100", "PCIE", "40GB"), Peak(312.0e12, 1.555e12)),
    (("A100", "40GB"), Peak(312.0e12, 1.555e12)),
    (("A100", "PCIE"), Peak(312.0e12, 1.935e12)),
    (("A100",), Peak(312.0e12, 2.039e12)),  # SXM4 80GB
)


def peak_for(device_name: str) -> Peak | None:
    """The peak numbers of a CUDA device by its name, or None when it is not in the table."""
    name = device_name.upper()
    for parts, peak in _PEAKS:
        if all(p in name for p in parts):
            return peak
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _unloaded_backends() -> dict[str, str]:
    """Craft backend modules that could not be imported here, with the reason."""
    import craft.ops

    fn = getattr(craft.ops, "unloaded_backends", None)
    return dict(fn()) if fn is not None else {}


def load_avg() -> list[float] | None:
    """The 1, 5 and 15-minute load averages now (None where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not available on this platform
        return None


def _nvidia_driver() -> str | None:
    """The NVIDIA driver's version from nvidia-smi (None when it cannot be asked)."""
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def machine_info(device: torch.device) -> dict[str, Any]:
    """Device, versions and date: what a recorded result must say about where it came from."""
    from craft import __version__

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": str(device),
        "device_name": device_name(device),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "liger_kernel": _version("liger-kernel"),
        "craft": __version__,
        "cuda": torch.version.cuda,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") or None,
        "load_avg": load_avg(),  # 1, 5 and 15 min: other work on the machine skews timings
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # torch's vector ISA
        "cpu_bf16": cpu_bf16_features(),  # native bf16 arithmetic (AMX-BF16 / AVX512-BF16)
    }
    info["craft_backends_not_loaded"] = _unloaded_backends()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_bytes"] = int(props.total_memory)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["cuda_driver"] = _nvidia_driver()
        peak = peak_for(info["device_name"])
        if peak:
            info["peak_bf16_tflops"] = peak.bf16_flops / 1e12
            info["peak_bandwidth_gbs"] = peak.bandwidth / 1e9
    return info
