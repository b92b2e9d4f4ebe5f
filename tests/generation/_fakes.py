"""Small models for the generation and evaluation tests.

`tiny_gpt` / `tiny_rnn` build the real models at toy sizes, with a large initialisation so that
logits are well separated (greedy decoding then has no near-ties). `Scripted` and `TableBigram`
follow the model contract with outputs known in advance.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from craft.config.components import GPTConfig, RNNConfig
from craft.models.gpt import GPT
from craft.models.rnn import RNNLM


def tiny_gpt(vocab_size: int, block_size: int = 16, seed: int = 0, **cfg: Any) -> GPT:
    torch.manual_seed(seed)
    kw: dict[str, Any] = {"n_layer": 2, "n_head": 2, "d_model": 32, "init_std": 0.3}
    return GPT(GPTConfig(block_size=block_size, **{**kw, **cfg}), vocab_size)


def tiny_rnn(vocab_size: int, seed: int = 0, cell: str = "lstm") -> RNNLM:
    torch.manual_seed(seed)
    model = RNNLM(RNNConfig(cell=cell, n_layer=2, d_embed=16, hidden_size=32), vocab_size)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)
    return model


class Scripted(nn.Module):
    """Predicts `script[n]` after having seen n tokens (with or without a cache)."""

    block_size = 64

    def __init__(self, vocab_size: int, script: list[int]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.vocab_size, self.script = vocab_size, script

    def new_cache(self, batch_size: int, device: Any, dtype: Any) -> dict[str, int]:
        return {"seen": 0}

    def forward(self, idx, targets=None, cache=None):
        start = cache["seen"] if cache is not None else 0
        if cache is not None:
            cache["seen"] += idx.shape[1]
        seen = range(start + 1, start + idx.shape[1] + 1)  # tokens seen at each position
        nxt = torch.tensor([self.script[min(n, len(self.script) - 1)] for n in seen])
        logits = F.one_hot(nxt, self.vocab_size).float() * 50.0  # (T, V)
        return logits.expand(idx.shape[0], -1, -1), None


class TableBigram(nn.Module):
    """Next-token logits depend only on the current token: logits = table[idx]."""

    block_size = 4

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.clone())
        self.vocab_size = table.shape[0]

    def forward(self, idx, targets=None, cache=None):
        logits = self.table[idx]  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss
