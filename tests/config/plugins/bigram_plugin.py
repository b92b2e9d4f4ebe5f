"""A model defined outside the craft package, registered the way a user's plugin would be."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from craft.config.registry import register_model


class BigramConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["bigram"] = "bigram"
    block_size: int = Field(16, ge=1, description="Context length.")
    vocab_size: int | None = Field(None, ge=1, description="Vocabulary size.")


class Bigram(nn.Module):
    """Next-token logits from the current token alone."""

    def __init__(self, vocab_size: int, block_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.table = nn.Embedding(vocab_size, vocab_size)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache=None):
        logits = self.table(idx)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


@register_model("bigram", config=BigramConfig)
def build(cfg: BigramConfig, vocab_size: int, **_: object) -> Bigram:
    return Bigram(cfg.vocab_size or vocab_size, cfg.block_size)
