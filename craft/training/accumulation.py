"""How the micro-batch losses of one optimizer step are weighted: by their valid target tokens.

A model returns the mean loss over the target tokens of its micro-batch that are not
`ignore_index` (padding, masked prompt tokens). Dividing each such mean by the number of
micro-batches weights a micro-batch with many ignored tokens as much as a full one, and DDP's
gradient average does the same across processes. `token_weights` gives the weight of each
micro-batch mean so that the accumulated, all-reduced gradient is the gradient of the mean over
every valid target token of the step, on every process: what one big batch would give.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100  # the targets the models' losses leave out (craft.ops' default)


def token_weights(
    targets: Sequence[torch.Tensor], world_size: int = 1, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Weights (k,) of the k micro-batch mean losses of one optimizer step on this process.

    w_i = world_size * n_i / N, with n_i the valid target tokens of micro-batch i and N those of
    the whole step summed over the `world_size` processes (one all-reduce of a scalar). Then
    sum_i w_i * mean_i, averaged over processes (as DDP/FSDP average gradients), is
    sum of token losses / N. A step without a valid token gets zero weights. Everything stays on
    the device: no host sync.
    """
    counts = torch.stack([(t != ignore_index).sum() for t in targets]).to(torch.float32)  # (k,)
    total = counts.sum()
    if world_size > 1:
        torch.distributed.all_reduce(total)  # sum over processes
    return counts * (world_size / total.clamp(min=1.0))
