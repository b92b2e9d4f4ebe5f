"""Training throughput: real optimizer steps of the Trainer on a recipe, timed step by step.

The run is the Trainer's own loop (model, data, optimizer and scheduler built through the
registry, Accelerate, mixed precision, clipping, compile) with evaluation, checkpoints, samples and
plots switched off and its run directory in a temporary folder. A callback times each step
between consecutive `on_step_end` hooks. The first `warmup` steps (allocator, autotuning,
compilation) are not counted.

- tokens/s: tokens of the timed steps divided by their total time; ms/step: the median step.
- MFU (CUDA, known device): FLOPs per token (6N + 12 * L * H * hs * T, see
  `craft.models.flops`) times tokens/s, over the device's dense bf16 peak.
- peak memory: on CUDA `torch.cuda.max_memory_allocated` over the timed steps (weights, gradients,
  optimizer state and activations). On the CPU one extra step runs under the profiler: the peak
  of torch's allocator during that step plus the parameters and optimizer state held between
  steps.
"""

from __future__ import annotations

import statistics
import tempfile
from typing import Any

import torch

from craft.bench.config import load_bench_config
from craft.bench.hardware import device_name, peak_for
from craft.bench.timing import allocation_peak, allocator_events, now, quiet_stderr
from craft.errors import ConfigError, TrainingError

__all__ = ["load_bench_config", "mfu", "run_train_bench"]

# Settings that keep a benchmark run to training steps only. Applied when the schema has the key.
_QUIET = {
    ("eval", "at_end"): False,
    ("checkpoint", "save_at_end"): False,
    ("checkpoint", "export"): False,
    ("checkpoint", "keep_best"): False,
    ("logging", "progress"): "none",
    ("logging", "plot"): False,
    ("logging", "sample_interval"): 0,
    ("logging", "trackers"): [],
}


def _quiet_config(cfg: Any, total_steps: int, output_dir: str) -> Any:
    """The config with evaluation, checkpoints and side outputs off, for `total_steps` steps."""
    from craft.config import from_dict, to_dict

    data = to_dict(cfg)
    never = total_steps + 1
    updates = {
        ("run", "output_dir"): output_dir,
        ("training", "max_steps"): total_steps,
        ("training", "log_interval"): never,
        ("eval", "interval"): never,
        ("checkpoint", "interval"): never,
        **_QUIET,
    }
    for (section, key), value in updates.items():
        fields = type(getattr(cfg, section)).model_fields
        if key in fields:
            data.setdefault(section, {})[key] = value
    if "early_stopping_patience" in data.get("training", {}):
        del data["training"]["early_stopping_patience"]
    return from_dict(data, label="bench config")


def _resident_bytes(model: torch.nn.Module, optimizer: Any) -> int:
    """Bytes of parameters and optimizer state: what a step starts with besides the batch."""
    seen: set[int] = set()
    total = 0
    tensors = list(model.parameters())
    opt = getattr(optimizer, "optimizer", optimizer)
    for state in getattr(opt, "state", {}).values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def run_train_bench(
    cfg: Any,
    *,
    steps: int,
    warmup: int,
    label: str = "",
) -> dict[str, Any]:
    """Run warmup + steps Trainer steps of `cfg` and return the throughput record."""
    from craft.training.callbacks import Callback
    from craft.training.trainer import Trainer

    if steps < 1 or warmup < 0:
        raise ConfigError(f"--steps {steps} / --warmup {warmup}: need steps >= 1 and warmup >= 0")

    class StepTimer(Callback):
        """Times each optimizer step; profiles one extra step on the CPU for its memory peak."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.losses: dict[int, float] = {}
            self.t_last = 0.0
            self.prof: Any = None
            self.cpu_step_peak: int | None = None
            self.resident: int | None = None

        def on_train_start(self, run: Any) -> None:
            self.t_last = now(run.device)

        def on_step_end(self, run: Any, metrics: dict[str, Any]) -> None:
            t = now(run.device)
            if self.prof is not None:
                self._stop_profile()
            self.times.append(t - self.t_last)
            done = len(self.times)
            if done in (1, warmup + steps):
                self.losses[done] = float(metrics["loss"])
            if done == warmup and run.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(run.device)
            if done == warmup + steps and run.device.type == "cpu":
                self.resident = _resident_bytes(run.model, trainer.optimizer)
                self._start_profile()
            self.t_last = now(run.device)

        def _start_profile(self) -> None:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            with quiet_stderr():
                self.prof.start()

        def _stop_profile(self) -> None:
            with quiet_stderr():
                self.prof.stop()
            events = self.prof.profiler.kineto_results.events()
            self.cpu_step_peak = allocation_peak(allocator_events(events))
            self.prof = None

    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="craft-bench-train-") as tmp:
        on_cpu_extra = 1  # the profiled step on the CPU (ignored on CUDA: one more timed step)
        run_cfg = _quiet_config(cfg, warmup + steps + on_cpu_extra, tmp)
        trainer = Trainer(run_cfg, callbacks=[timer])
        device = trainer.device
        model = trainer.unwrapped_model
        tokens_per_step = int(trainer.tokens_per_step)
        seq_len = int(getattr(cfg.model, "block_size", 0) or 0)
        result = trainer.fit()
        if result.status != "completed":
            raise TrainingError(f"benchmark run {result.status} at step {result.step}")
    timed = timer.times[warmup : warmup + steps]
    if len(timed) < steps:
        raise TrainingError(
            f"benchmark run ended after {len(timer.times)} of {warmup + steps} steps"
        )
    total = sum(timed)
    tokens_per_s = tokens_per_step * steps / total
    record: dict[str, Any] = {
        "recipe": label,
        "device": str(device),
        "device_name": device_name(device),
        "model": cfg.model.type,
        "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "precision": cfg.training.precision,
        "compile": bool(cfg.training.compile),
        "kernels": _kernels(model, device.type),
        "batch_size": cfg.training.batch_size,
        "grad_accum_steps": cfg.training.grad_accum_steps,
        "seq_len": seq_len,
        "tokens_per_step": tokens_per_step,
        "warmup_steps": warmup,
        "steps": steps,
        "ms_per_step": 1e3 * statistics.median(timed),
        "ms_per_step_mean": 1e3 * total / steps,
        "step_ms": [round(1e3 * t, 3) for t in timed],
        "tokens_per_s": tokens_per_s,
        "loss_first": timer.losses[1],
        "loss_last": timer.losses[warmup + steps],
    }
    record.update(mfu(model, seq_len, tokens_per_s, device))
    if device.type == "cuda":
        record["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated(device))
        record["mem_method"] = "torch.cuda.max_memory_allocated over the timed steps"
    elif timer.cpu_step_peak is not None and timer.resident is not None:
        record["peak_mem_bytes"] = timer.resident + timer.cpu_step_peak
        record["mem_method"] = (
            "parameters + optimizer state + torch.profiler allocator peak of one extra step"
        )
    else:
        record["peak_mem_bytes"] = None
        record["mem_method"] = f"n/a on {device.type}"
    return record


def _kernels(model: torch.nn.Module, device_type: str) -> dict[str, str]:
    """The backend each op of `model` takes on `device_type` (its own table, else the default)."""
    from craft import ops

    table = getattr(model, "kernels", None)
    return (table if isinstance(table, ops.Kernels) else ops.DEFAULT).plan(device_type)


def mfu(
    model: torch.nn.Module, seq_len: int, tokens_per_s: float, device: torch.device
) -> dict[str, Any]:
    """FLOPs per token of `model` and its MFU at `tokens_per_s` (CUDA, a device in the table)."""
    try:
        from craft.models.flops import flops_per_token

        fpt = float(flops_per_token(model, seq_len))
        formula = "6N + 12*L*H*hs*T (craft.models.flops)"
    except (ImportError, TypeError):
        n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        fpt, formula = 6.0 * n, "6N"
    out: dict[str, Any] = {"flops_per_token": fpt, "flops_formula": formula}
    if device.type != "cuda":
        out.update(mfu=None, mfu_note="MFU is reported on CUDA devices only")
        return out
    peak = peak_for(device_name(device))
    if peak is None:
        out.update(mfu=None, mfu_note=f"no peak FLOP/s known for {device_name(device)}")
        return out
    out.update(
        mfu=fpt * tokens_per_s / peak.bf16_flops,
        peak_tflops=peak.bf16_flops / 1e12,
        mfu_note="achieved model FLOP/s over the dense bf16 peak",
    )
    return out
