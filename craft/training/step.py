"""One optimizer step: forward and backward over the micro-batches, clip, guard, optimizer, schedule.

Each micro-batch loss (the mean over its valid target tokens) is weighted by its share of the
valid target tokens of the whole step on all processes (`craft.training.accumulation`) before
backward, so the accumulated gradient is that of the mean over every valid token of the step,
however many tokens each micro-batch ignores. DDP syncs gradients on the last micro-batch only.

The step waits for the device exactly once: the optimizer must not step on a non-finite loss or
gradient norm, and only the host can decide to skip the call, so the decision waits for the
backward pass (as PyTorch's fp16 `GradScaler` does). The loss and the gradient norm cross in that
one transfer; a guard computed on the device would add kernels without removing the wait. With
several processes the decision and a stop request are agreed in one all-reduce before it.
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
from craft.training.accumulation import token_weights


@dataclass
class StepOutput:
    """What one step leaves for logging and for the decision to go on."""

    loss: float  # mean loss over this process's micro-batches
    grad_norm: float  # global gradient norm before clipping
    lr: float  # the learning rate this step used
    finite: bool  # False: nothing was updated (the gradients were dropped)
    stop: bool  # some process asked to stop after this step

    def error(self, step: int, newest: Path | None) -> TrainingError:
        """The error of a non-finite step `step`; `newest`: the newest checkpoint on disk."""
        return TrainingError(
            f"non-finite training loss ({self.loss}) or gradient norm "
            f"({self.grad_norm}) at step {step}; stopped before the optimizer step, "
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

    def forward_backward(
        self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, *, last: bool
    ) -> torch.Tensor:
        """Weighted loss of one micro-batch (B, T), its gradient accumulated; DDP syncs on the
        `last`. `weight`: the micro-batch's share of the step's valid tokens (None: 1)."""
        sync = contextlib.nullcontext() if last else self.acc.no_sync(self.model)
        with sync:
            _, loss = self.model(x, y)
            scaled = loss if weight is None else loss * weight
            scaled.backward() if self.direct else self.acc.backward(scaled)
        return scaled.detach()

    def __call__(
        self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], *, stop: bool = False
    ) -> StepOutput:
        device = self.acc.device
        micro_batches = []
        for _ in range(self.accum):
            x, y = next(batches)
            micro_batches.append((x.to(device, non_blocking=True), y.to(device, non_blocking=True)))
        weights = (  # (accum,) on the device: no host sync
            token_weights([y for _, y in micro_batches], self.acc.num_processes)
            if self.accum > 1 or self.multi
            else None
        )
        losses = [
            self.forward_backward(
                x, y, None if weights is None else weights[i], last=i == self.accum - 1
            )
            for i, (x, y) in enumerate(micro_batches)  # (B, T) each
        ]
        # this process's share of the step's token mean (the mean itself on one process)
        loss = losses[0] if self.accum == 1 else torch.stack(losses).sum()
        grad_norm = self._clip()
        lr = float(self.raw_optimizer.param_groups[0]["lr"])

        loss_v, norm_v, bad_any, stop = self._read(loss, grad_norm, stop)
        if bad_any:
            self.optimizer.zero_grad(set_to_none=True)
            return StepOutput(loss_v, norm_v, lr, finite=False, stop=stop)

        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutput(loss_v, norm_v, lr, finite=True, stop=stop)

    def _read(
        self, loss: torch.Tensor, grad_norm: torch.Tensor, stop: bool
    ) -> tuple[float, float, bool, bool]:
        """(loss, grad norm, non-finite on some process, stop on some process): the step's one
        host transfer. With several processes both flags are agreed first in one all-reduce, so
        every process takes the same decision."""
        vals = torch.stack([loss.float(), grad_norm])
        if not self.multi:
            loss_v, norm_v = vals.tolist()
            bad = not math.isfinite(loss_v) or (self.check_grad and not math.isfinite(norm_v))
            return loss_v, norm_v, bad, stop
        bad_t = ~torch.isfinite(vals[0])
        if self.check_grad:
            bad_t = bad_t | ~torch.isfinite(vals[1])
        flags = torch.stack([bad_t, bad_t.new_tensor(stop)]).float()
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        loss_v, norm_v, bad_v, stop_v = torch.cat([vals, flags]).tolist()
        return loss_v, norm_v, bad_v > 0, stop_v > 0

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
