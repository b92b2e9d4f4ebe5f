"""A recurrent language model (RNN, LSTM or GRU): the baseline the transformer is measured against.

Configured by `RNNConfig`: token embedding, stacked recurrent layers, dropout between layers and
on the output, and an output layer optionally tied to the embedding (through a projection when
hidden_size != d_embed). The hidden state is carried across calls through a cache object, so
generation feeds one token at a time without re-reading the prompt.

Shapes: B batch, T tokens, E d_embed, Hd hidden_size, L layers, V vocab.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from craft import ops
from craft.config.components import RNNConfig

_CELLS: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class RNNState:
    """The hidden state carried between calls: h (L, B, Hd) and, for an LSTM, the cell state c.

    `pos` counts the tokens consumed so far. The tensors keep their autograd history; call
    `detach_()` between truncated-backpropagation windows.
    """

    def __init__(self, h: torch.Tensor, c: torch.Tensor | None = None) -> None:
        self.h = h  # (L, B, Hd)
        self.c = c  # (L, B, Hd) or None
        self.pos = 0

    @property
    def batch_size(self) -> int:
        return self.h.shape[1]

    def get(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The state in the form nn.RNN/nn.GRU (h) or nn.LSTM ((h, c)) take."""
        return self.h if self.c is None else (self.h, self.c)

    def set(self, state: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> None:
        if isinstance(state, tuple):
            self.h, self.c = state
        else:
            self.h = state

    def detach_(self) -> None:
        """Cut the autograd history (the values stay)."""
        self.h = self.h.detach()
        self.c = None if self.c is None else self.c.detach()

    def reset(self) -> None:
        """Back to the zero initial state (in place)."""
        self.h.zero_()
        if self.c is not None:
            self.c.zero_()
        self.pos = 0

    def rows(self, start: int, stop: int) -> RNNState:
        """The state of rows start..stop-1; a forward with it writes into this state (no autograd)."""
        return _RNNRows(self, start, stop)

    def copy_row(self, src: int, dst: int) -> None:
        """Make row `dst` a copy of row `src`."""
        self.h[:, dst] = self.h[:, src]
        if self.c is not None:
            self.c[:, dst] = self.c[:, src]


class _RNNRows(RNNState):
    """Rows of a batched state: `set` copies the new state into the parent's rows (generation)."""

    def __init__(self, parent: RNNState, start: int, stop: int) -> None:
        c = None if parent.c is None else parent.c[:, start:stop]
        super().__init__(parent.h[:, start:stop], c)

    def set(self, state: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> None:
        h, c = state if isinstance(state, tuple) else (state, None)
        self.h.copy_(h)
        if c is not None and self.c is not None:
            self.c.copy_(c)


class RNNLM(nn.Module):
    """Embedding -> recurrent layers -> (projection) -> output layer.

    `forward(idx, targets=None, cache=None) -> (logits, loss)`; with a cache the recurrence starts
    from the cached state and leaves the new state in it. `block_size` is None: the model reads
    sequences of any length (the config's block_size is only the training window).
    """

    block_size: int | None = None

    def __init__(
        self, cfg: RNNConfig, vocab_size: int, fused_loss: bool = False, kernels: Any = None
    ) -> None:
        super().__init__()
        self.kernels = ops.kernels_for(kernels)  # the loss's backend table (see craft.ops)
        self.config = cfg
        self.vocab_size = vocab_size
        self.fused_loss = fused_loss
        self.wte = nn.Embedding(vocab_size, cfg.d_embed)
        self.drop = nn.Dropout(cfg.dropout)
        self.rnn = _CELLS[cfg.cell](
            cfg.d_embed,
            cfg.hidden_size,
            num_layers=cfg.n_layer,
            batch_first=True,
            dropout=cfg.dropout if cfg.n_layer > 1 else 0.0,  # applied between layers
        )
        out = cfg.hidden_size
        self.proj = None
        if cfg.tie_embeddings and cfg.hidden_size != cfg.d_embed:
            self.proj = nn.Linear(cfg.hidden_size, cfg.d_embed, bias=False)
            out = cfg.d_embed
        self.lm_head = nn.Linear(out, vocab_size, bias=True)
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.02)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.lm_head.bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # one (V, E) tensor

    def num_params(self, exclude_position_embeddings: bool = False) -> int:
        """Parameters counted once each; a recurrent model has no position embeddings."""
        return sum(p.numel() for p in self.parameters())

    def new_cache(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> RNNState:
        """A zero initial state for `batch_size` sequences (default: the model's device/dtype)."""
        w = self.wte.weight
        shape = (self.config.n_layer, batch_size, self.config.hidden_size)
        kw = {"device": w.device if device is None else device, "dtype": dtype or w.dtype}
        h = torch.zeros(shape, **kw)  # (L, B, Hd)
        return RNNState(h, torch.zeros(shape, **kw) if self.config.cell == "lstm" else None)

    def forward(  # type: ignore[override]
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: RNNState | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) int64 -> logits (B, T, V) (None when the loss is fused) and the mean loss."""
        b, t = idx.shape
        if cache is not None and cache.batch_size != b:
            raise ValueError(f"cache holds {cache.batch_size} sequences, input has {b}")
        x = self.drop(self.wte(idx))  # (B, T, E)
        state = None if cache is None else cache.get()
        if state is not None:  # the recurrence takes its state in its weights' dtype
            dt = self.rnn.weight_hh_l0.dtype
            state = state.to(dt) if torch.is_tensor(state) else tuple(s.to(dt) for s in state)
        y, new_state = self.rnn(x, state)  # (B, T, Hd); state (L, B, Hd)
        if cache is not None:
            cache.set(new_state)
            cache.pos += t
        y = self.drop(y)
        if self.proj is not None:
            y = self.proj(y)  # (B, T, E)
        if targets is None:
            return self.lm_head(y), None  # (B, T, V)
        if self.fused_loss:
            loss = self.kernels.linear_cross_entropy(
                y.reshape(b * t, -1), self.lm_head.weight, targets.reshape(b * t), self.lm_head.bias
            )
            return None, loss
        logits = self.lm_head(y)  # (B, T, V)
        loss = self.kernels.cross_entropy(logits.view(b * t, -1), targets.reshape(b * t))
        # As in GPT: while training a fused loss kernel may reuse the logits' memory for their
        # gradient, so they are only handed back under no_grad.
        return (None if torch.is_grad_enabled() else logits), loss


def build(
    cfg: RNNConfig, vocab_size: int, *, fused_loss: bool = False, kernels: Any = None
) -> RNNLM:
    """The model builder of the registry; `cfg.vocab_size` wins over `vocab_size` when set."""
    return RNNLM(cfg, cfg.vocab_size or vocab_size, fused_loss=fused_loss, kernels=kernels)


def param_counts(cfg: RNNConfig, vocab_size: int):  # -> craft.models.flops.ParamCounts
    """The parameter counts of `RNNLM(cfg, vocab_size)`, by arithmetic (nothing is built)."""
    from craft.models.flops import ParamCounts

    v, e, h = cfg.vocab_size or vocab_size, cfg.d_embed, cfg.hidden_size
    gates = {"rnn": 1, "gru": 3, "lstm": 4}[cfg.cell] * h
    # weight_ih, weight_hh, bias_ih, bias_hh per layer; layer 0 reads the embedding
    recurrent = gates * (e + h + 2) + (cfg.n_layer - 1) * gates * (2 * h + 2)
    proj = h * e if cfg.tie_embeddings and h != e else 0
    out = e if proj else h
    head = v if cfg.tie_embeddings else v * out + v  # the bias is never tied
    embedding = v * e
    total = embedding + recurrent + proj + head
    tied = v * e if cfg.tie_embeddings else 0
    return ParamCounts(total, embedding, total - embedding, total - embedding + tied)
