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
    if cpu and cfg.training.precision == "fp16":
        # Accelerate would run fp32 arithmetic under an fp16 label (no autocast, no loss scaler).
        raise ConfigError(
            "training.precision = 'fp16': fp16 mixed precision needs a GPU; on the CPU use "
            "'bf16' (or 'no')"
        )
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
    check_world_size(acc.num_processes)
    if fsdp_requested() and not is_fsdp(acc):
        _fsdp_on_cpu(acc)
    if cfg.training.precision == "fp16" and getattr(acc, "scaler", None) is None:
        logging.getLogger("craft").warning(
            "training.precision = 'fp16' on %s runs without a loss scaler; prefer 'bf16'",
            acc.device,
        )
    return acc


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (`accelerate launch` with an FSDP config sets
    ACCELERATE_USE_FSDP; under torchrun set it, and the FSDP_* options, yourself)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("true", "1", "yes")


def _fsdp_on_cpu(acc: Any) -> None:
    """FSDP2 over gloo for several CPU processes, which Accelerate leaves as DDP (it applies FSDP
    to GPU process groups only); anything else that asked for FSDP and did not get it is refused."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    kind = str(acc.distributed_type).rsplit(".", 1)[-1]
    if acc.num_processes < 2:
        raise ConfigError(
            "FSDP was requested (ACCELERATE_USE_FSDP) but only 1 process runs: FSDP shards over "
            "2 or more processes; launch several (accelerate launch --num_processes N, or "
            "torchrun --nproc_per_node N) or drop the FSDP config"
        )
    version = os.environ.get("FSDP_VERSION", "2")
    if kind != "MULTI_CPU" or version != "2":
        raise ConfigError(
            f"FSDP was requested (ACCELERATE_USE_FSDP, fsdp_version {version}) but Accelerate "
            f"set up {kind} and Craft cannot apply FSDP there; on CPUs Craft runs FSDP2 "
            "(fsdp_version: 2)"
        )
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)  # options from the FSDP_* variables
    if acc.state.mixed_precision != "no":
        plugin.set_mixed_precision(acc.state.mixed_precision)
    acc.state.fsdp_plugin = plugin
    acc.state.distributed_type = DistributedType.FSDP


def check_world_size(obtained: int) -> None:
    """Refuse a run whose launcher asked for more processes than started: WORLD_SIZE set by
    torchrun, or `accelerate launch --num_processes N` (which starts one process with --cpu)."""
    asked = os.environ.get("WORLD_SIZE")
    source = "WORLD_SIZE"
    if asked is None:
        asked, source = _accelerate_launch_processes(), "accelerate launch --num_processes"
    if asked is None or not asked.isdigit() or int(asked) == obtained:
        return
    raise ConfigError(
        f"{source} {asked} asked for {asked} processes but {obtained} started (accelerate launch "
        "starts one process with --cpu, or without --multi_gpu on a machine with no GPU); on "
        f"CPUs start several with torchrun --nproc_per_node {asked} -m craft.train ..., or "
        f"accelerate launch --multi_gpu --num_processes {asked} -m craft.train ... (no --cpu)"
    )


def _accelerate_launch_processes() -> str | None:
    """N when the parent process is `accelerate launch ... --num_processes N` (Linux), else None."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = f.read(1 << 16).decode("utf-8", "replace").split("\0")
    except OSError:
        return None
    return launch_processes(argv)


def launch_processes(argv: list[str]) -> str | None:
    """The N of an `accelerate launch ... --num_processes N` command line, else None."""
    head = argv[:4]
    launcher = any(a == "launch" or a.endswith(("commands.launch", "launch.py")) for a in head)
    if not launcher or not any("accelerate" in a for a in head):
        return None
    for i, arg in enumerate(argv):
        for flag in ("--num_processes", "--num-processes"):
            if arg == flag and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
    return None


def is_sharded(model: Any) -> bool:
    """Whether `model` (or a submodule) is FSDP-wrapped: FSDP2's fully_shard or FSDP1."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def describe_distributed(accelerator: Any, model: Any) -> str:
    """What the processes actually run: `FSDP2 (fully_shard) over 2 processes (gloo) on cpu`."""
    n = accelerator.num_processes
    if n == 1 and not is_sharded(model):
        return f"single process on {accelerator.device}"
    import torch.distributed as dist

    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"
    if is_sharded(model):
        kind = "FSDP2 (fully_shard)" if _is_fsdp2(model) else "FSDP"
    elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
        kind = "DDP"
    else:
        kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    return f"{kind} over {n} processes ({backend}) on {accelerator.device.type}"


def _is_fsdp2(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


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
