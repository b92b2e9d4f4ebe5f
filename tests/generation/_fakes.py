"""Small stand-ins that follow the model and tokenizer contracts of docs/architecture.md.

They let the generation and evaluation logic be checked independently of the real model code:
a tiny causal transformer with a KV cache and learned positions, a GRU with its hidden state as
the cache, and character / byte tokenizers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from craft.errors import TokenizerError


class CharTok:
    """Character vocabulary; unknown characters raise TokenizerError (like the char tokenizer)."""

    def __init__(self, chars: str, eos: bool = False, bos: bool = False) -> None:
        self.itos = sorted(set(chars))
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        n = len(self.itos)
        self.eos_id = n if eos else None
        self.bos_id = n + int(eos) if bos else None
        self.vocab_size = n + int(eos) + int(bos)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise TokenizerError(f"character {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.itos[i] if i < len(self.itos) else "" for i in ids)


class ByteTok:
    """UTF-8 bytes; decoding replaces incomplete sequences with U+FFFD."""

    vocab_size = 256
    bos_id = None
    eos_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class KVCache:
    def __init__(self, n_layer: int, shape: tuple[int, ...], device, dtype) -> None:
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.pos = 0


class TinyGPT(nn.Module):
    """A two-layer causal transformer with learned positions and a fixed-size KV cache."""

    def __init__(
        self, vocab_size: int, block_size: int = 16, d: int = 32, n_head: int = 2, seed: int = 0
    ):
        super().__init__()
        torch.manual_seed(seed)
        self.vocab_size, self.block_size, self.n_head, self.d = vocab_size, block_size, n_head, d
        self.wte = nn.Embedding(vocab_size, d)
        self.wpe = nn.Embedding(block_size, d)
        self.qkv = nn.ModuleList([nn.Linear(d, 3 * d) for _ in range(2)])
        self.proj = nn.ModuleList([nn.Linear(d, d) for _ in range(2)])
        self.mlp = nn.ModuleList([nn.Linear(d, d) for _ in range(2)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab_size)
        for p in self.parameters():  # large weights: peaked, well separated logits
            nn.init.normal_(p, std=0.5)

    def new_cache(self, batch_size: int, device, dtype) -> KVCache:
        hs = self.d // self.n_head
        return KVCache(2, (batch_size, self.n_head, self.block_size, hs), device, dtype)

    def forward(self, idx, targets=None, cache=None):
        b, t = idx.shape
        start = cache.pos if cache is not None else 0
        if start + t > self.block_size:
            raise RuntimeError(f"cache overflow: {start} + {t} > {self.block_size}")
        x = self.wte(idx) + self.wpe(torch.arange(start, start + t, device=idx.device))
        for layer in range(2):
            q, k, v = self.qkv[layer](x).split(self.d, dim=-1)
            q, k, v = (z.view(b, t, self.n_head, -1).transpose(1, 2) for z in (q, k, v))
            if cache is not None:
                cache.k[layer][:, :, start : start + t] = k
                cache.v[layer][:, :, start : start + t] = v
                k = cache.k[layer][:, :, : start + t]
                v = cache.v[layer][:, :, : start + t]
            mask = torch.ones(t, start + t, dtype=torch.bool, device=idx.device).tril(start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + self.proj[layer](y.transpose(1, 2).reshape(b, t, self.d))
            x = x + torch.tanh(self.mlp[layer](x))
        if cache is not None:
            cache.pos = start + t
        logits = self.head(self.ln(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


class RNNState:
    def __init__(self, h: torch.Tensor) -> None:
        self.h = h


class TinyRNN(nn.Module):
    """A GRU language model; the cache is its hidden state."""

    block_size = None

    def __init__(self, vocab_size: int, hidden: int = 32, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.vocab_size = vocab_size
        self.emb = nn.Embedding(vocab_size, hidden)
        self.rnn = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)
        for p in self.parameters():
            nn.init.normal_(p, std=0.5)

    def new_cache(self, batch_size: int, device, dtype) -> RNNState:
        return RNNState(torch.zeros(1, batch_size, self.rnn.hidden_size, device=device, dtype=dtype))

    def forward(self, idx, targets=None, cache=None):
        h0 = cache.h if cache is not None else None
        out, h = self.rnn(self.emb(idx), h0)
        if cache is not None:
            cache.h = h
        logits = self.head(out)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


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
