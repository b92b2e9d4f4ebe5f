"""A decoder-only transformer language model (GPT), readable in one file.

Configured by `GPTConfig` (the `model` section): pre-norm blocks with LayerNorm or RMSNorm,
learned or rotary positions, a GELU or SwiGLU feed-forward, grouped-query attention, optional
biases, dropout (attention probabilities and residual branches), tied embeddings and GPT-2
initialisation. Every op with more than one implementation (attention, norm, the loss) goes
through the model's `craft.ops.Kernels` table, which picks the kernel backend once per input
signature (from the `kernels` config section, or the process default when built without one).

Shapes: B batch, T tokens, C d_model, H query heads, Hkv key/value heads, hs head size, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from craft import ops
from craft.config.components import GPTConfig


class KVCache:
    """Keys and values of every layer for `batch_size` rows (sequences), preallocated to `max_len`.

    Each row has its own length, `lengths[b]` (tokens stored; a CPU int64 tensor, so reading it
    never waits for the device), so rows can join, leave and restart independently, as in a
    server's batch. A forward pass with the cache writes the keys/values of its T new tokens at
    positions lengths[b] .. lengths[b] + T - 1 of each row, in place, and then advances every
    length by T. While all rows hold the same number of tokens the model attends to the stored
    prefix with the causal op; otherwise `mask` tells each query which keys belong to its row.
    `rows(i, j)` is a cache over rows i..j-1 sharing this one's memory (prefill one row of a batch).
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        max_len: int,
        head_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = (n_layer, batch_size, n_kv_head, max_len, head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, Hkv, max_len, hs)
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, Hkv, max_len, hs)
        self.lengths = torch.zeros(batch_size, dtype=torch.long)  # (B,) on the CPU
        self._clear_step()

    def _clear_step(self) -> None:
        self.start: int | None = 0  # first new position when every row has the same length
        self.positions: torch.Tensor | None = None  # (B, T) new positions of ragged rows
        self.mask: torch.Tensor | None = None  # (B, 1, T, S) keys each query may see (ragged)
        self.keys = 0  # S: keys the attention of this step reads
        self.last: torch.Tensor | None = None  # a packed step's last token of each row

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def pos(self) -> int:
        """Tokens stored in the longest row (all rows, unless rows were filled separately)."""
        return int(self.lengths.max()) if self.lengths.numel() else 0

    def begin(self, t: int, device: torch.device) -> None:
        """Prepare a forward pass of T new tokens per row: their positions, and the mask if ragged."""
        lengths = self.lengths.tolist()
        first, longest = lengths[0], max(lengths)
        self.keys = longest + t
        if min(lengths) == longest:
            self.start, self.positions, self.mask = first, None, None
            return
        self.start = None
        pos = (self.lengths[:, None] + torch.arange(t)).to(device)  # (B, T)
        self.positions = pos
        self.mask = pos[:, None, :, None] >= torch.arange(self.keys, device=device)  # (B,1,T,S)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, hs) of `layer` at each row's positions; return keys/values to read.

        Returns (B, Hkv, S, hs) each, in the dtype the queries have (autocast may differ): the
        stored prefix, or with ragged rows every row's first S positions (see `mask`).
        """
        if self.start is not None:
            end = self.start + k.shape[2]
            self.k[layer, :, :, self.start : end] = k
            self.v[layer, :, :, self.start : end] = v
        else:
            b, hkv, t, hs = k.shape
            where = self.positions[:, None, :, None].expand(b, hkv, t, hs)  # (B, Hkv, T, hs)
            self.k[layer].scatter_(2, where, k.to(self.k.dtype))
            self.v[layer].scatter_(2, where, v.to(self.v.dtype))
        s = self.keys
        return self.k[layer, :, :, :s].to(k.dtype), self.v[layer, :, :, :s].to(v.dtype)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of this step's queries q (B, H, T, hs) over k/v (B, Hkv, S, hs) of ragged rows."""
        return ragged_attention(q, k, v, self.mask)

    def advance(self, t: int) -> None:
        """End a forward pass: every row now holds T more tokens."""
        self.lengths += t
        self._clear_step()

    def reset(self) -> None:
        """Forget every stored token of these rows (the memory is reused)."""
        self.lengths.zero_()

    def rows(self, start: int, stop: int) -> KVCache:
        """The cache of rows start..stop-1; it shares memory (and lengths) with this one."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.lengths = self.lengths[start:stop]
        view._clear_step()
        return view

    def copy_row(self, src: int, dst: int) -> None:
        """Make row `dst` a copy of row `src` (its stored tokens and length)."""
        n = int(self.lengths[src])
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n

    def fixed_step(self, pos: torch.Tensor, keys: torch.Tensor | None = None) -> FixedStep:
        """A one-token step over all rows with static shapes (see `FixedStep`): what compiles."""
        return FixedStep(self, pos, keys)

    def packed_step(self, segments: Sequence[tuple[int, int, int]]) -> PackedStep:
        """A forward of different numbers of new tokens per row, packed as one sequence (see
        `PackedStep`); `segments` are (row, first position, tokens)."""
        return PackedStep(self, segments)


class FixedStep(KVCache):
    """One decoding step over a whole `KVCache` whose shapes never change, for `torch.compile`.

    Row b's new token sits at position pos[b] (B,), a device tensor, so no length reaches Python
    and nothing depends on its value but the data: the key/value is written there in place and
    attention reads the first S positions of every row, masked to 0..pos[b]. S is the length of
    `keys` (0..S-1, S > max(pos)): all max_len positions when it is None; a caller that marks its
    length dynamic (`torch._dynamo.mark_dynamic`) gets one graph for every S, which reads only
    the part of the cache in use (at batch 8 and a full window the cache outweighs a small
    model's weights). Shares the cache's memory; `lengths` is left to the caller (the positions
    of rows not in use must still lie inside the window, e.g. 0).
    """

    def __init__(self, cache: KVCache, pos: torch.Tensor, keys: torch.Tensor | None = None) -> None:
        self.k, self.v, self.lengths = cache.k, cache.v, cache.lengths
        if keys is None:
            keys = torch.arange(self.max_len, device=pos.device)  # (S,)
        self.start, self.keys = None, keys.shape[0]
        self.positions = pos[:, None]  # (B, 1)
        self.mask = (keys <= self.positions)[:, None, None]  # (B, 1, 1, S)

    def begin(self, t: int, device: torch.device) -> None:
        if t != 1:
            raise ValueError(f"a fixed-shape step takes one token per row, got {t}")

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, 1, hs) at each row's position; return the first S positions.

        One indexed write into the whole (L, B, Hkv, max_len, hs) tensor, which the compiler
        makes an in-place update (a write through a per-layer view would copy the cache).
        """
        b, hkv = k.shape[:2]
        rows = torch.arange(b, device=k.device)[:, None]  # (B, 1)
        heads = torch.arange(hkv, device=k.device)[None, :]  # (1, Hkv)
        where = (torch.tensor(layer, device=k.device), rows, heads, self.positions)  # -> (B, Hkv)
        self.k.index_put_(where, k[:, :, 0].to(self.k.dtype))
        self.v.index_put_(where, v[:, :, 0].to(self.v.dtype))
        s = self.keys
        return self.k[layer, :, :, :s].to(k.dtype), self.v[layer, :, :, :s].to(v.dtype)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One query per head, q (B, H, 1, hs), over the first S keys k/v (B, Hkv, S, hs), masked.

        Written out as products and sums rather than SDPA or matmuls, so that the compiler fuses
        the scores, mask, softmax and weighted sum into one pass over the keys and values (SDPA
        would be an opaque call; a matmul over a cache slice would make the graph depend on the
        slice's strides); the softmax runs in float32. Query head h reads key/value head h // G.
        """
        b, h, _, hs = q.shape
        g = h // k.shape[1]
        q = q.reshape(b, h // g, g, 1, hs)  # (B, Hkv, G, 1, hs): a key/value head's G query heads
        att = (q * k[:, :, None]).sum(-1).float() * (1.0 / math.sqrt(hs))  # (B, Hkv, G, S)
        att = att.masked_fill(~self.mask, float("-inf")).softmax(dim=-1)  # mask (B, 1, 1, S)
        y = (att.to(v.dtype)[..., None] * v[:, :, None]).sum(-2)  # (B, Hkv, G, hs)
        return y.reshape(b, h, 1, hs)

    def advance(self, t: int) -> None:
        pass


class PackedStep(KVCache):
    """One forward over rows that each take a different number of new tokens, packed as one
    sequence (batch 1) so that every linear layer runs once over all of them.

    `segments` are (row, start, count): the row's next `count` tokens at positions start..,
    in the order they appear in the packed input; single-token segments (decoding rows) come
    first, rows with more tokens (a new prompt, a refilled window) after them (a single-token
    segment after a longer one attends as the longer ones do). A server uses it
    to prefill a newly arrived prompt in the same forward as the other rows' decoding step, so
    that neither waits for a forward of its own. Attention: the single-token rows in one masked
    call over their cache rows, each longer segment causally over its own row. `last` holds the
    packed index of each segment's last token (the logits the caller needs). Shares the cache's
    memory; `advance` sets each row's length to start + count.
    """

    def __init__(self, cache: KVCache, segments: Sequence[tuple[int, int, int]]) -> None:
        self.k, self.v, self.lengths = cache.k, cache.v, cache.lengths
        device = self.k.device
        for i, (_, _, count) in enumerate(segments):
            if count < 1:
                raise ValueError(f"segment {i} has {count} tokens: expected >= 1")
        singles = 0  # the leading single-token segments (later ones attend as the longer do)
        while singles < len(segments) and segments[singles][2] == 1:
            singles += 1
        self.segments = list(segments)
        self.singles = singles
        rows = [r for r, _, c in segments for _ in range(c)]
        pos = [s + j for _, s, c in segments for j in range(c)]
        self.rows = torch.tensor(rows, device=device)  # (N,) row of each packed token
        self.positions = torch.tensor(pos, device=device)[None]  # (1, N)
        offsets, n = [], 0
        for _, _, c in segments:
            n += c
            offsets.append(n - 1)
        self.last = torch.tensor(offsets, device=device)  # (R,) each segment's last token
        self.start = None
        self.mask = True  # type: ignore[assignment]  # not None: attention goes through `attend`
        self.keys = max(s + c for _, s, c in segments)
        self.layer = 0
        # what every layer's attention reads, worked out once for the step
        self.heads: torch.Tensor | None = None  # (1, Hkv), on the first update
        self.single_rows: slice | torch.Tensor = slice(0, 0)
        self.single_keys = 0
        self.single_mask: torch.Tensor | None = None
        if singles:
            first = [r for r, _, _ in segments[:singles]]
            adjacent = first == list(range(first[0], first[0] + singles))
            # adjacent rows are read through a view; others are gathered
            self.single_rows = (
                slice(first[0], first[0] + singles) if adjacent else self.rows[:singles]
            )
            self.single_keys = max(st for _, st, _ in segments[:singles]) + 1
            keys = torch.arange(self.single_keys, device=device)
            pos = self.positions[0, :singles, None]  # (d, 1)
            self.single_mask = (keys <= pos)[:, None, None]  # (d, 1, 1, S): a row's own keys
        self.longer: list[tuple[int, int, int, int, torch.Tensor | None]] = []
        off = singles
        for r, st, c in segments[singles:]:
            keep = None
            if st:  # bottom-right causal: query j sees keys 0..st + j
                keep = (
                    torch.arange(st + c, device=device)
                    <= st + torch.arange(c, device=device)[:, None]
                )
            self.longer.append((r, st, c, off, keep))  # keep (c, st + c)
            off += c

    @property
    def batch_size(self) -> int:
        return 1

    def begin(self, t: int, device: torch.device) -> None:
        if t != self.positions.shape[1]:
            raise ValueError(f"packed step of {self.positions.shape[1]} tokens got {t}")

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (1, Hkv, N, hs) at each token's row and position; `attend` reads them."""
        if self.heads is None:
            self.heads = torch.arange(k.shape[1], device=k.device)[None, :]  # (1, Hkv)
        where = (self.rows[:, None], self.heads, self.positions[0][:, None])  # -> (N, Hkv)
        self.k[layer].index_put_(where, k[0].transpose(0, 1).to(self.k.dtype))
        self.v[layer].index_put_(where, v[0].transpose(0, 1).to(self.v.dtype))
        self.layer = layer
        return k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Queries q (1, H, N, hs) over each token's own row in the cache -> (1, H, N, hs)."""
        kc, vc = self.k[self.layer], self.v[self.layer]  # (B, Hkv, max_len, hs)
        gqa = q.shape[1] != kc.shape[1]
        out = []
        d = self.singles
        if d:
            s = self.single_keys
            kd = kc[self.single_rows, :, :s].to(q.dtype)  # (d, Hkv, S, hs)
            vd = vc[self.single_rows, :, :s].to(q.dtype)
            qd = q[0, :, :d].transpose(0, 1)[:, :, None]  # (d, H, 1, hs)
            y = ragged_attention(qd, kd, vd, self.single_mask)  # (d, H, 1, hs)
            out.append(y[:, :, 0].transpose(0, 1)[None])  # (1, H, d, hs)
        for r, st, c, off, keep in self.longer:
            ks = kc[r : r + 1, :, : st + c].to(q.dtype)  # (1, Hkv, st + c, hs)
            vs = vc[r : r + 1, :, : st + c].to(q.dtype)
            qs = q[:, :, off : off + c]  # (1, H, c, hs)
            y = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=keep, is_causal=keep is None, enable_gqa=gqa
            )
            out.append(y)
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)

    def advance(self, t: int) -> None:
        for r, st, c in self.segments:
            self.lengths[r] = st + c


class Norm(nn.Module):
    """LayerNorm (with an optional bias) or RMSNorm (never a bias) over the last dim."""

    def __init__(self, dim: int, kind: str, bias: bool, eps: float, kernels: ops.Kernels) -> None:
        super().__init__()
        self.kind, self.eps, self.kernels = kind, eps, kernels
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias and kind == "layernorm" else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):  # type: ignore[override]
        """norm(x), or with `residual`: (norm(x + residual), x + residual) in one op.

        Under autocast the normalised output is in the autocast dtype and the sum keeps the
        promoted dtype (the fp32 residual stream stays fp32): see `craft.ops.norm`.
        """
        return self.kernels.norm(x, self.weight, self.bias, self.kind, self.eps, residual)


def rope_tables(
    max_len: int, head_size: int, theta: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (max_len, hs/2) of the rotation angles pos * theta^(-2i/hs), in float32."""
    inv_freq = theta ** (-torch.arange(0, head_size, 2, device=device).float() / head_size)
    angles = torch.outer(torch.arange(max_len, device=device).float(), inv_freq)  # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head of x (B, h, T, hs) by the angles in cos/sin (T, hs/2)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, h, T, hs/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, h, T, hs)


def ragged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Attention over a KV cache whose rows hold different numbers of tokens.

    q (B, H, T, hs), k/v (B, Hkv, S, hs), mask (B, 1, T, S) bool: True where a query may read a
    key (its own row's earlier and current positions). `craft.ops.attention` has a causal mask
    only, so this arbitrary-mask case calls SDPA directly. Query head h reads key/value head
    h // (H // Hkv): the G = H // Hkv query heads of one key/value head are stacked as G*T queries.
    """
    b, h, t, hs = q.shape
    g = h // k.shape[1]
    q = q.reshape(b, h // g, g * t, hs)  # (B, Hkv, G*T, hs)
    if g > 1:
        mask = mask.repeat(1, 1, g, 1)  # (B, 1, G*T, S): row gi*T + ti is query ti
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, Hkv, G*T, hs)
    return y.reshape(b, h, t, hs)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with grouped key/value heads and optional RoPE."""

    def __init__(self, cfg: GPTConfig, kernels: ops.Kernels) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.head_size = cfg.d_model // cfg.n_head
        self.kernels = kernels
        qkv = (self.n_head + 2 * self.n_kv_head) * self.head_size
        self.c_attn = nn.Linear(cfg.d_model, qkv, bias=cfg.bias)  # q, k and v in one matmul
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.attn_dropout = cfg.attn_dropout  # on the attention probabilities, while training
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        b, t, c = x.shape  # (B, T, C)
        hs, h, hkv = self.head_size, self.n_head, self.n_kv_head
        q, k, v = self.c_attn(x).split([h * hs, hkv * hs, hkv * hs], dim=2)
        q = q.view(b, t, h, hs).transpose(1, 2)  # (B, H, T, hs)
        k = k.view(b, t, hkv, hs).transpose(1, 2)  # (B, Hkv, T, hs)
        v = v.view(b, t, hkv, hs).transpose(1, 2)  # (B, Hkv, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, hs), S = stored + T
        if cache is None or cache.mask is None:
            p = self.attn_dropout if self.training else 0.0
            y = self.kernels.attention(q, k, v, True, None, p)  # (B, H, T, hs); bottom-right causal
        else:
            y = cache.attend(q, k, v)  # rows of different lengths
        y = y.transpose(1, 2).contiguous().view(b, t, c)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


def mlp_hidden_size(cfg: GPTConfig) -> int:
    """cfg.mlp_hidden, else 4*C for GELU and 8/3*C rounded up to a multiple of 64 for SwiGLU."""
    if cfg.mlp_hidden is not None:
        return cfg.mlp_hidden
    if cfg.mlp != "swiglu":
        return 4 * cfg.d_model
    return 64 * math.ceil(8 * cfg.d_model / 3 / 64)


class MLP(nn.Module):
    """Feed-forward block: GELU(x W1) W2 (exact or tanh GELU), or SwiGLU: (SiLU(x Wg) * x Wu) W2."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        hidden = mlp_hidden_size(cfg)
        width = 2 * hidden if cfg.mlp == "swiglu" else hidden  # SwiGLU: gate and up in one matmul
        self.c_fc = nn.Linear(cfg.d_model, width, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h = self.c_fc(x)  # (B, T, hidden) or (B, T, 2 * hidden)
        if self.kind == "gelu":
            h = F.gelu(h)
        elif self.kind == "gelu_tanh":  # GPT-2's gelu_new
            h = F.gelu(h, approximate="tanh")
        else:
            gate, up = h.chunk(2, dim=-1)  # (B, T, hidden) each
            h = F.silu(gate) * up
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, cfg: GPTConfig, kernels: ops.Kernels) -> None:
        super().__init__()
        self.ln_1 = Norm(cfg.d_model, cfg.norm, cfg.bias, cfg.norm_eps, kernels)
        self.attn = CausalSelfAttention(cfg, kernels)
        self.ln_2 = Norm(cfg.d_model, cfg.norm, cfg.bias, cfg.norm_eps, kernels)
        self.mlp = MLP(cfg)

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        a = self.attn(self.ln_1(x), rope, cache, layer)  # (B, T, C)
        h, x = self.ln_2(a, residual=x)  # x <- x + a;  h = ln_2(x)  (one fused op)
        return x + self.mlp(h)  # (B, T, C)


class GPT(nn.Module):
    """The language model: token (+ position) embedding, blocks, final norm, output layer.

    `forward(idx, targets=None, cache=None) -> (logits, loss)`. With `fused_loss` and targets the
    loss comes from `ops.linear_cross_entropy` on the last hidden state and logits is None. With
    targets and grad enabled logits is None too: the cross-entropy kernel may write the gradient
    into the logits' memory. Call without targets, or under `torch.no_grad()`, to get them.
    `kernels` (a `kernels` config section or an op -> backend mapping) gives the model its own
    backend table; without it the model follows the process default (`craft.ops.use_backends`).
    """

    def __init__(
        self, cfg: GPTConfig, vocab_size: int, fused_loss: bool = False, kernels: Any = None
    ) -> None:
        super().__init__()
        self.config = cfg
        self.kernels = ops.kernels_for(kernels)
        self.vocab_size = vocab_size
        self.block_size = cfg.block_size
        self.fused_loss = fused_loss
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.head_size = cfg.d_model // cfg.n_head

        self.wte = nn.Embedding(vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg, self.kernels) for _ in range(cfg.n_layer)])
        self.ln_f = Norm(cfg.d_model, cfg.norm, cfg.bias, cfg.norm_eps, self.kernels)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.positions == "rope":
            cos, sin = rope_tables(cfg.block_size, self.head_size, cfg.rope_theta)
            # not in the state dict: recomputed from the config, kept in float32
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hs/2)
            self.register_buffer("rope_sin", sin, persistent=False)  # (block_size, hs/2)
        else:
            self.rope_cos = self.rope_sin = None

        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), one per residual add
        resid_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.c_proj.weight, mean=0.0, std=resid_std)
            nn.init.normal_(block.mlp.c_proj.weight, mean=0.0, std=resid_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # one (V, C) tensor, initialised as embedding

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def num_params(self, exclude_position_embeddings: bool = False) -> int:
        """Parameters counted once each (tied weights once); optionally without wpe."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_position_embeddings and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    def new_cache(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_len: int | None = None,
    ) -> KVCache:
        """An empty KV cache for up to block_size tokens (default: the model's device/dtype).

        `max_len` > block_size leaves spare positions that are never filled (a compiled step
        reads a slice of the cache that is then never the whole of it, see `FixedStep`).
        """
        if max_len is not None and max_len < self.block_size:
            raise ValueError(f"max_len = {max_len}: expected >= block_size ({self.block_size})")
        w = self.wte.weight
        return KVCache(
            len(self.blocks),
            batch_size,
            self.n_kv_head,
            self.block_size if max_len is None else max_len,
            self.head_size,
            device=w.device if device is None else device,
            dtype=w.dtype if dtype is None else dtype,
        )

    def forward(  # type: ignore[override]
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        join: Join | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) int64 -> logits (B, T, V) (None when the loss is fused) and the mean loss.

        `last_only` (without targets): logits of the last position only, (B, 1, V), which is all a
        decoding step needs (the output layer is the largest matmul of a small model's step).
        `join` (decoding with a cache, see `Join`): new sequences may join this forward between
        blocks; the logits are then those of the packed step it returned, (1, R, V).
        """
        b, t = idx.shape
        start: int | None = 0
        if cache is not None:
            if cache.batch_size != b:
                raise ValueError(f"cache holds {cache.batch_size} sequences, input has {b}")
            cache.begin(t, idx.device)
            if cache.keys > self.block_size:
                raise ValueError(
                    f"sequence of {cache.keys - t} cached + {t} new tokens exceeds block_size "
                    f"{self.block_size}"
                )
            start = cache.start  # None: rows of different lengths, positions per row
        elif t > self.block_size:
            raise ValueError(f"sequence of {t} tokens exceeds block_size {self.block_size}")

        x, rope = self._embed(idx, start, cache)  # (B, T, C)
        for layer, block in enumerate(self.blocks):
            if join is not None and (joined := join(layer)) is not None:
                x, rope, cache = self._join(x, layer, *joined)  # (1, N, C), the packed step
            x = block(x, rope, cache, layer)  # (B, T, C)
        if cache is not None:
            cache.advance(t)
        if last_only and targets is None:
            last = getattr(cache, "last", None)  # a packed step: each row's last token
            x = x[:, -1:] if last is None else x[:, last]  # (B, 1, C) or (1, R, C)
        x = self.ln_f(x)  # (B, T, C)

        if targets is None:
            return self.lm_head(x), None  # (B, T, V)
        if self.fused_loss:
            loss = self.kernels.linear_cross_entropy(
                x.reshape(b * t, -1), self.lm_head.weight, targets.reshape(b * t)
            )
            return None, loss
        logits = self.lm_head(x)  # (B, T, V)
        loss = self.kernels.cross_entropy(logits.view(b * t, -1), targets.reshape(b * t))
        # When training, a fused loss kernel may reuse the logits' memory for their gradient, so
        # they are not handed back; under no_grad (eval) they are intact and returned.
        return (None if torch.is_grad_enabled() else logits), loss

    def _embed(
        self, idx: torch.Tensor, start: int | None, cache: KVCache | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Token (+ position) embedding of idx (B, T) and the RoPE tables of its positions: from
        `start` on, or (start None) each row's own, `cache.positions` (B, T)."""
        t = idx.shape[1]
        if start is not None:
            pos = torch.arange(start, start + t, device=idx.device)  # (T,)
        else:
            pos = cache.positions  # type: ignore[union-attr]  # (B, T)
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(pos)  # + (T, C) or (B, T, C)
        return self.drop(x), self._rope(start, t, pos)

    def _rope(
        self, start: int | None, t: int, pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos, sin of positions start..start+t-1 (T, hs/2), or (start None) of each row's own
        positions pos (B, T) -> (B, 1, T, hs/2); None without RoPE."""
        if self.rope_cos is None:
            return None
        if start is not None:
            return self.rope_cos[start : start + t], self.rope_sin[start : start + t]
        return self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]

    def _join(
        self, x: torch.Tensor, layer: int, idx: torch.Tensor, alone: PackedStep, step: PackedStep
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None, PackedStep]:
        """New tokens idx (1, T') through blocks 0..layer-1 on their own (`alone`), then packed
        after the tokens in flight, x (B, 1, C) or (1, N, C), for the remaining blocks (`step`)."""
        alone.begin(idx.shape[1], idx.device)
        y, rope = self._embed(idx, None, alone)  # (1, T', C)
        for i in range(layer):
            y = self.blocks[i](y, rope, alone, i)
        x = torch.cat([x.reshape(1, -1, x.shape[-1]), y], dim=1)  # (1, N, C)
        step.begin(x.shape[1], x.device)
        return x, self._rope(None, x.shape[1], step.positions), step


# GPT.forward's `join`: called before each block (its index) of a decoding step; returns None, or
# the new tokens idx (1, T') to join there with `alone`, a packed step of their rows only, and
# `step`, the packed step of the tokens in flight (first, in their order) and the new ones.
Join = Callable[[int], "tuple[torch.Tensor, PackedStep, PackedStep] | None"]


def build(cfg: GPTConfig, vocab_size: int, *, fused_loss: bool = False, kernels: Any = None) -> GPT:
    """The model builder of the registry; `cfg.vocab_size` wins over `vocab_size` when set."""
    return GPT(cfg, cfg.vocab_size or vocab_size, fused_loss=fused_loss, kernels=kernels)


def param_counts(cfg: GPTConfig, vocab_size: int):  # -> craft.models.flops.ParamCounts
    """The parameter counts of `GPT(cfg, vocab_size)`, by arithmetic (nothing is built)."""
    from craft.models.flops import ParamCounts

    c, v = cfg.d_model, cfg.vocab_size or vocab_size
    hs, kv = c // cfg.n_head, cfg.n_kv_head or cfg.n_head
    qkv = (cfg.n_head + 2 * kv) * hs
    hidden = mlp_hidden_size(cfg)
    width = 2 * hidden if cfg.mlp == "swiglu" else hidden
    b = int(cfg.bias)
    norm = c + (c if cfg.bias and cfg.norm == "layernorm" else 0)
    attn = c * qkv + b * qkv + c * c + b * c  # c_attn, c_proj
    mlp = c * width + b * width + hidden * c + b * c  # c_fc, c_proj
    embedding = v * c + (cfg.block_size * c if cfg.positions == "learned" else 0)
    head = 0 if cfg.tie_embeddings else v * c
    total = embedding + cfg.n_layer * (2 * norm + attn + mlp) + norm + head
    tied = v * c if cfg.tie_embeddings else 0
    return ParamCounts(total, embedding, total - embedding, total - embedding + tied)
