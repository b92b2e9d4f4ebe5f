"""One optimizer step: forward and backward over the micro-batches, clip, guard, optimizer, schedule.

Each micro-batch loss is the mean over its B*T tokens and is divided by `grad_accum_steps` before
backward, so the accumulated gradient is that of the mean loss over the whole step (all
micro-batches hold the same number of tokens). DDP syncs gradients on the last micro-batch only.

The step synchronises with the host exactly once: the optimizer must not step on a non-finite
loss or gradient norm, and only the host can decide to skip a call. That decision waits for the
backward pass, as a `GradScaler` does for fp16; the loss and gradient norm themselves stay on the
device until someone reads them (the Trainer does at log time).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from craft.errors import TrainingError


@dataclass
class StepOutput:
    """What one step leaves for logging; tensors stay on the device (reading them syncs)."""

    loss: torch.Tensor  # () mean loss over this process's micro-batches
    grad_norm: torch.Tensor  # () global gradient norm before clipping
    lr: float  # the learning rate this step used
    finite: bool  # False: nothing was updated (the gradients were dropped)
    stop: bool  # some process asked to stop after this step

    def error(self, step: int, newest: Path | None) -> TrainingError:
        """The error of a non-finite step `step`; `newest`: the newest checkpoint on disk."""
        return TrainingError(
            f"non-finite training loss ({float(self.loss)}) or gradient norm "
            f"({float(self.grad_norm)}) at step {step}; stopped before the optimizer step, "
            f"checkpoints on disk are intact (newest: {newest or 'none written yet'}); try a "
            "lower optimizer.lr, training.grad_clip or training.precision"
        )


class TrainStep:
    """`step(batches, stop=...)` runs one optimizer step of `model` on the next micro-batches.

    `direct`: call backward, clipping and the optimizer directly instead of through Accelerate's
    wrappers (which cost ~0.3 ms per step on a CPU and are needed only for FSDP, DeepSpeed and a
    loss scaler).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Any,
        scheduler: Any,
        accelerator: Any,
        training: Any,
        *,
        direct: bool,
    ) -> None:
        """`training`: the config's `training` section (grad_accum_steps, grad_clip)."""
        self.model, self.scheduler, self.acc = model, scheduler, accelerator
        self.raw_optimizer = getattr(optimizer, "optimizer", optimizer)
        self.optimizer = self.raw_optimizer if direct else optimizer
        self.accum = training.grad_accum_steps
        self.max_norm = training.grad_clip if training.grad_clip > 0 else math.inf
        self.check_grad = getattr(accelerator, "scaler", None) is None  # fp16: the scaler does
        self.multi = accelerator.num_processes > 1
        self.direct = direct

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, *, last: bool) -> torch.Tensor:
        """Loss of one micro-batch (B, T), its gradient accumulated; DDP syncs on the `last`."""
        sync = contextlib.nullcontext() if last else self.acc.no_sync(self.model)
        with sync:
            _, loss = self.model(x, y)
            scaled = loss / self.accum if self.accum > 1 else loss
            scaled.backward() if self.direct else self.acc.backward(scaled)
        return loss.detach()

    def __call__(
        self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], *, stop: bool = False
    ) -> StepOutput:
        device = self.acc.device
        losses = []
        for micro in range(self.accum):
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # (B, T)
            losses.append(self.forward_backward(x, y, last=micro == self.accum - 1))
        loss = losses[0] if self.accum == 1 else torch.stack(losses).mean()
        grad_norm = self._clip()
        lr = float(self.raw_optimizer.param_groups[0]["lr"])

        bad = ~torch.isfinite(loss)
        if self.check_grad:
            bad = bad | ~torch.isfinite(grad_norm)
        if self.multi:  # every process must take the same decisions: one all-reduce for both
            flags = torch.stack([bad, bad.new_tensor(stop)]).float()
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            bad_any, stop = (v > 0 for v in flags.tolist())  # the step's one host sync
        else:
            bad_any = bool(bad)  # the step's one host sync
        if bad_any:
            self.optimizer.zero_grad(set_to_none=True)
            return StepOutput(loss, grad_norm, lr, finite=False, stop=stop)

        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutput(loss, grad_norm, lr, finite=True, stop=stop)

    def _clip(self) -> torch.Tensor:
        """Clip the gradients to `grad_clip` (inf: measure only); the norm before clipping."""
        params = self.model.parameters()
        if self.direct:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm)
        else:
            norm = self.acc.clip_grad_norm_(params, self.max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
            norm = norm.full_tensor()
        return torch.as_tensor(norm, device=self.acc.device).float()
