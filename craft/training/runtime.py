"""The process side of a run: global switches, the Accelerator, and decisions the processes share.

Accelerate picks the device, mixed precision and process group (one process, DDP or FSDP, from
`accelerate launch` / `torchrun`); decisions about files are taken by the main process and
broadcast, so every process sees the same run directory and the same error.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from craft.errors import ConfigError, CraftError
from craft.training.precision import accelerate_precision

T = TypeVar("T")

# Distributed types whose hot loop needs nothing from Accelerate's wrappers (without a scaler).
_PLAIN_TYPES = {"NO", "MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU"}


def set_determinism(deterministic: bool) -> None:
    """Deterministic kernels (reproducible, slower) or TF32 matmuls (fast) for the process."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def has_accelerator() -> bool:
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "is_available"):
        return bool(acc.is_available())
    return torch.cuda.is_available()


def make_accelerator(cfg: Any) -> Any:
    """The Accelerator of `cfg` (`run.cpu`, `training.precision`, `training.compile`)."""
    from accelerate import Accelerator

    cpu = cfg.run.cpu or not has_accelerator()
    try:
        acc = Accelerator(
            cpu=cpu,
            mixed_precision=accelerate_precision(cfg.training.precision),
            dynamo_backend="inductor" if cfg.training.compile else "no",
            step_scheduler_with_optimizer=False,
        )
    except (ValueError, NotImplementedError) as e:
        raise ConfigError(
            f"training.precision = {cfg.training.precision!r}: not usable on this machine "
            f"({'cpu' if cpu else 'accelerator'}): {e}"
        ) from None
    if cfg.training.precision == "fp16" and getattr(acc, "scaler", None) is None:
        logging.getLogger("craft").warning(
            "training.precision = 'fp16' on %s runs without a loss scaler; prefer 'bf16'",
            acc.device,
        )
    return acc


def runs_plain(accelerator: Any) -> bool:
    """True when the loop may call backward, clipping and the optimizer directly (no FSDP,
    DeepSpeed or loss scaler)."""
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    return getattr(accelerator, "scaler", None) is None and kind in _PLAIN_TYPES


def is_fsdp(accelerator: Any) -> bool:
    return "FSDP" in str(accelerator.distributed_type)


def decided_on_main(fn: Callable[[], T], *, is_main: bool, world_size: int) -> T:
    """`fn()` run on the main process, its result (or its CraftError) given to every process."""
    payload: list[Any] = [None, None, None]  # result, error type, message
    if is_main:
        try:
            payload[0] = fn()
        except CraftError as e:
            payload[1:] = [type(e), e.message]
    if world_size > 1:
        from accelerate.utils import broadcast_object_list

        payload = broadcast_object_list(payload)
    if payload[1] is not None:
        raise payload[1](payload[2])
    return payload[0]


def versions() -> dict[str, str]:
    """Versions of what wrote a checkpoint."""
    import accelerate
    import safetensors

    import craft

    return {
        "craft": craft.__version__,
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }
