"""Validation loss during training: fixed windows of the validation split, shared by the processes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch


def eval_shard(num_batches: int, rank: int, world_size: int) -> list[tuple[int, bool]]:
    """(batch index, counted) pairs that process `rank` evaluates: batches rank, rank + world, ...

    Every process gets the same number of entries (a sharded FSDP forward is a collective, and
    DDP may broadcast buffers in one), so a process short of a batch repeats batch 0 uncounted.
    """
    rounds = -(-num_batches // world_size)
    picks = [rank + k * world_size for k in range(rounds)]
    return [(i, True) if i < num_batches else (0, False) for i in picks]


def eval_windows(cfg: Any) -> int:
    """Validation windows per evaluation: `eval.windows`, or the deprecated `eval.batches` times
    the eval batch size (warned about: that set depends on the batch size)."""
    from craft.config.sections import DEFAULT_EVAL_WINDOWS

    if cfg.eval.batches is None:
        return cfg.eval.windows or DEFAULT_EVAL_WINDOWS
    n = cfg.eval.batches * (cfg.eval.batch_size or cfg.training.batch_size)
    logging.getLogger("craft").warning(
        "eval.batches is deprecated: it scores batches x batch size = %d windows, so the "
        "validation loss depends on the batch size; set eval.windows = %d instead",
        n,
        n,
    )
    return n


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    plan: list[tuple[int, bool]],
    device: torch.device,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Mean loss per token over the counted batches of `plan`, summed over the processes.

    `reduce_sum` adds a tensor up over all processes (None: one process). The model is left in
    training mode.
    """
    model.eval()
    total = torch.zeros(2, device=device)  # (sum of token losses, tokens)
    for i, counted in plan:
        x, y = batches[i]  # (B, T) each
        _, loss = model(x.to(device), y.to(device))
        if counted:
            total[0] += loss.float() * y.numel()
            total[1] += y.numel()
    model.train()
    if reduce_sum is not None:
        total = reduce_sum(total)
    return float((total[0] / total[1]).item())


class Validation:
    """The validation windows of a run, this process's share of them, and their mean loss.

    The windows are fixed for the run (`eval.windows` of them, spread evenly over the split, in
    batches of `eval.batch_size`); each process evaluates its share and the losses are summed
    over processes.
    """

    def __init__(self, cfg: Any, data: Any, accelerator: Any) -> None:
        batch_size = cfg.eval.batch_size or cfg.training.batch_size
        self.batches = data.eval_batches("val", batch_size, windows=eval_windows(cfg))
        self.plan = eval_shard(
            len(self.batches), accelerator.process_index, accelerator.num_processes
        )
        self.acc = accelerator

    def __len__(self) -> int:
        return len(self.batches)

    def loss(self, model: torch.nn.Module) -> float:
        multi = self.acc.num_processes > 1
        reduce_sum = (lambda t: self.acc.reduce(t, reduction="sum")) if multi else None
        return validation_loss(model, self.batches, self.plan, self.acc.device, reduce_sum)
