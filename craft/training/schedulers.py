"""Learning-rate schedules as LambdaLR factors of the peak lr: a pure function of the step.

Because the factor depends only on the step (and max_steps), a resumed run recomputes exactly the
lr an uninterrupted run would use, even when `max_steps` or the peak lr changed in between.

The factor is indexed by completed steps: training step k (1-based) uses factor(k - 1), so the
first step uses factor(0) and the last one (k = max_steps) factor(max_steps - 1), which is where
the decaying schedules reach their floor (`min_lr`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR


def _warmup(step: int, warmup: int) -> float | None:
    """Linear warmup factor in (0, 1] while step < warmup, else None."""
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    return None


def _decay_progress(step: int, start: int, max_steps: int) -> float:
    """0 at index `start` (the peak) to 1 at index max_steps - 1 (the last step), then 1."""
    return min(1.0, max(0.0, (step - start) / max(1, max_steps - 1 - start)))


def cosine_factor(step: int, *, warmup: int, max_steps: int, floor: float) -> float:
    """Warmup, then half a cosine from 1 down to `floor` (min_lr / lr) at the last step."""
    w = _warmup(step, warmup)
    if w is not None:
        return w
    progress = _decay_progress(step, warmup, max_steps)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_factor(step: int, *, warmup: int, max_steps: int, floor: float) -> float:
    """Warmup, then a straight line from 1 down to `floor` at the last step."""
    w = _warmup(step, warmup)
    if w is not None:
        return w
    progress = _decay_progress(step, warmup, max_steps)
    return 1.0 - (1.0 - floor) * progress


def constant_factor(step: int, *, warmup: int) -> float:
    w = _warmup(step, warmup)
    return 1.0 if w is None else w


def wsd_factor(
    step: int, *, warmup: int, max_steps: int, decay_fraction: float, floor: float
) -> float:
    """Warmup-stable-decay: warmup, a constant plateau, then a linear decay over the last fraction.

    The last `round(decay_fraction * max_steps)` steps run below the peak; the final one at `floor`.
    """
    w = _warmup(step, warmup)
    if w is not None:
        return w
    decay_steps = max(1, round(decay_fraction * max_steps))
    decay_start = max(warmup, max_steps - 1 - decay_steps)  # the plateau's last index
    if step < decay_start:
        return 1.0
    return 1.0 - (1.0 - floor) * _decay_progress(step, decay_start, max_steps)


def _floor(min_lr: float) -> Callable[[float], float]:
    return lambda base_lr: min(1.0, min_lr / base_lr) if base_lr > 0 else 0.0


def _lambda_lr(optimizer: torch.optim.Optimizer, factor: Callable[[int, float], float]) -> LambdaLR:
    """One closure per param group (groups share the peak lr but we keep LambdaLR general)."""
    lambdas = []
    for group in optimizer.param_groups:
        base = float(group.get("initial_lr", group["lr"]))

        def fn(step: int, base: float = base) -> float:
            return factor(step, base)

        lambdas.append(fn)
    return LambdaLR(optimizer, lambdas)


def build_cosine(cfg: Any, optimizer: torch.optim.Optimizer, max_steps: int) -> LambdaLR:
    """Linear warmup to the peak lr, cosine decay to `min_lr` at max_steps."""
    floor = _floor(cfg.min_lr)
    return _lambda_lr(
        optimizer,
        lambda s, base: cosine_factor(
            s, warmup=cfg.warmup_steps, max_steps=max_steps, floor=floor(base)
        ),
    )


def build_linear(cfg: Any, optimizer: torch.optim.Optimizer, max_steps: int) -> LambdaLR:
    """Linear warmup to the peak lr, linear decay to `min_lr` at max_steps."""
    floor = _floor(cfg.min_lr)
    return _lambda_lr(
        optimizer,
        lambda s, base: linear_factor(
            s, warmup=cfg.warmup_steps, max_steps=max_steps, floor=floor(base)
        ),
    )


def build_constant(cfg: Any, optimizer: torch.optim.Optimizer, max_steps: int) -> LambdaLR:
    """Linear warmup, then the peak lr."""
    return _lambda_lr(optimizer, lambda s, base: constant_factor(s, warmup=cfg.warmup_steps))


def build_wsd(cfg: Any, optimizer: torch.optim.Optimizer, max_steps: int) -> LambdaLR:
    """Warmup, stable at the peak lr, then linear decay to `min_lr` over `decay_fraction`."""
    floor = _floor(cfg.min_lr)
    return _lambda_lr(
        optimizer,
        lambda s, base: wsd_factor(
            s,
            warmup=cfg.warmup_steps,
            max_steps=max_steps,
            decay_fraction=cfg.decay_fraction,
            floor=floor(base),
        ),
    )


def restore_scheduler(
    scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict[str, Any], step: int
) -> None:
    """Put a freshly built scheduler at `step`, keeping its current base lrs and schedule.

    For LambdaLR schedules the lr is recomputed from the step (so a changed peak lr or max_steps
    takes effect); other schedulers get their saved state back.
    """
    if isinstance(scheduler, LambdaLR):
        scheduler.last_epoch = step
        lrs = [
            base * fn(step)
            for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
        ]
    else:
        base_lrs = list(scheduler.base_lrs)
        scheduler.load_state_dict(state)
        scheduler.base_lrs = base_lrs
        lrs = list(state.get("_last_lr", scheduler.get_last_lr()))
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports


def scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """The JSON-serialisable part of a scheduler's state (closures are rebuilt from the config)."""
    state = scheduler.state_dict()
    return {
        k: v
        for k, v in state.items()
        if k != "lr_lambdas" and isinstance(v, (int, float, str, bool, list, type(None)))
    }
