"""The decoding engine: batched KV-cached decoding with sequences joining and leaving between steps.

`craft generate` (all samples of a prompt as one batch) and `craft serve` (whatever requests are
in flight) both drive a `DecodeEngine`:

    engine = DecodeEngine(model, max_rows=8)
    rows = engine.add(prompt_ids, sampling, generators, max_new_tokens=100, eos_id=eos)
    while engine.active:
        for row, token in engine.step():   # one token for every active row
            ...

`add` prefills the prompt once (logits of the last position only) and copies the cache row for
every further sample of the same prompt. `step` samples the pending logits of every row (each row
with its own parameters and generator, see `craft.sampling`), retires finished rows, and runs one
forward pass over all remaining rows to get their next logits; a server runs its two halves,
`sample` and `advance`, apart, so that tokens go out before the forward pass, and adds requests
with `add_many(..., defer=True)`: their prompts are prefilled by the next `advance`, in the same
forward as every other row's next token (a cache's `packed_step`: rows taking different numbers
of tokens, packed as one sequence), so a new request never stalls the batch for a forward of its
own; rows whose window is full are refilled in that forward too. `advance(admit=...)` goes
further: prompts added while the forward runs join it between blocks (a GPT's `join`). Rows live
in slots 0..n-1 of one batched cache; a retired row's slot is taken by the last row (its cache row
is copied), so the batch stays contiguous.

Models: a GPT's KV cache and an RNN's state implement the row operations the batch needs
(`rows(i, j)`, `copy_row(src, dst)`, `reset()`). A model whose cache lacks them is decoded with
one cache per row (one forward per row and step); a model without `new_cache` recomputes the
window at every step. `compile=True` runs each step through `torch.compile` of a fixed-shape step
(a cache with `fixed_step`, e.g. a GPT's): all `max_rows` rows every time, positions as a tensor,
attention under a mask, so one graph serves every step; prefills stay
eager. Attention reads the cache only up to the longest row, through one graph whatever that
length (a dynamic dimension; the cache gets one spare position so that the slice read is never
the whole cache). The graph holds the model's weights as constants (Inductor's freezing, see
`COMPILE_SETTINGS`): an engine decodes with the weights its model had when the engine compiled.
Context window: when a row's cache is full, the row restarts from its most recent
`refill_tokens` tokens (default three quarters of the window; see craft/generation.py).
"""

from __future__ import annotations

import inspect
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from craft.errors import ConfigError, GenerationError
from craft.sampling import SamplingParams, sample_rows

Segment = tuple["Row", int, list[int]]  # a row's tokens in a packed forward, from a position


@dataclass(eq=False)
class Row:
    """One sequence being decoded. `tokens` are the sampled ones (an eos token included)."""

    index: int  # the caller's number for it (e.g. sample i of a request)
    sampling: SamplingParams
    generator: torch.Generator | None
    max_new_tokens: int
    eos_id: int | None
    prompt_tokens: int
    context: list[int]  # the tokens the model may still need (the last block_size)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (eos) | "length" | "cancelled"
    slot: int = -1
    cached: int = 0  # tokens held by the row's cache
    pending: bool = False  # added with `defer`: the next `advance` prefills it
    source: Row | None = None  # a pending further sample: copies this row's prefill

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Request:
    """Rows to add: one per generator, all continuing `prompt` (see `DecodeEngine.add`)."""

    prompt: Sequence[int]
    sampling: SamplingParams
    generators: Sequence[torch.Generator | None]
    max_new_tokens: int
    eos_id: int | None = None
    first_index: int = 0


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


# Inductor settings of the compiled decode step, applied while it compiles (its first call) only.
# `freezing`: the weights become constants of the graph, so the CPU backend pre-packs them for
# oneDNN/MKL matmuls; a decoding engine never changes its model's weights (a model trained
# further needs a new engine, which compiles anew).
COMPILE_SETTINGS: dict[str, Any] = {"freezing": True}
# On the CPU also `cpp_wrapper`: the graph's kernels are called from C++ rather than from a
# Python wrapper, which takes a millisecond or more off a small model's step for a longer compile.
CPU_COMPILE_SETTINGS: dict[str, Any] = {"cpp_wrapper": True}
# And for a bf16/fp16 model on the CPU, Inductor's C++ GEMM template for the weight products
# (`max_autotune` with the "CPP" backend only, so nothing is benchmarked: one choice per product,
# a product the template cannot take keeps oneDNN's). Its micro-kernels widen bf16/fp16 weights
# to fp32 in registers; oneDNN's bf16 matmul on a CPU without native bf16 (no AVX512-BF16/AMX)
# made the compiled step 1.4-1.6x slower at char_gpt shape (over the floor's 1.5x). fp32
# keeps MKL's pre-packed matmul, which was faster than the template at batch 8. Measured in
# bench/results/decode_speed.md; the cost is a longer compile (20-30 s more at char_gpt shape).
CPU_LOW_PRECISION_COMPILE_SETTINGS: dict[str, Any] = {
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP",
}


class DecodeEngine:
    """Decodes up to `max_rows` sequences at once over one batched cache.

    Each row draws from the generator it was added with (rows may share one).
    `use_cache=False` recomputes the last `block_size` tokens at every step (the reference).
    `compile=True` compiles the decode step (see the module docstring); the first step pays the
    compile time (`compile_seconds`), and a model or machine it cannot compile for is an error.
    The caller puts the model in eval mode and runs the engine under `torch.no_grad()` or lets
    `step`/`add` do it (they are decorated).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        max_rows: int,
        *,
        use_cache: bool = True,
        refill_tokens: int | None = None,
        compile: bool = False,
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows = {max_rows}: expected >= 1")
        self.model = model
        self.max_rows = max_rows
        self.device, self.dtype = model_device_dtype(model)
        self.block: int | None = getattr(model, "block_size", None)
        self.keep = 0
        if self.block is not None:
            self.keep = self.block * 3 // 4 if refill_tokens is None else refill_tokens
            if not 1 <= self.keep <= self.block:
                raise ValueError(
                    f"refill_tokens = {self.keep}: expected 1..block_size ({self.block})"
                )
        self.slots: list[Row] = []  # row of each slot 0..n-1
        self.logits: torch.Tensor | None = None  # (max_rows, V) next-token logits of each slot
        self._unfed = False  # rows were sampled and await `advance` (their logits are stale)
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        self._last_only = {"last_only": True} if "last_only" in params else {}
        self.cache: Any = None
        self.row_caches: list[Any] = []
        self.mode = "recompute"
        if use_cache and callable(getattr(model, "new_cache", None)):
            cache = model.new_cache(max_rows, self.device, self.dtype)
            if callable(getattr(cache, "rows", None)) and callable(
                getattr(cache, "copy_row", None)
            ):
                self.mode, self.cache = "batched", cache
            else:
                self.mode = "per_row"
        # packed steps: a forward in which rows take different numbers of tokens (`add_many`
        # with `defer`, and refilled windows, ride along with the other rows' decoding step)
        self.packed = (
            self.mode == "batched"
            and not compile
            and callable(getattr(self.cache, "packed_step", None))
        )
        self._deferred = 0  # rows added with `defer` that await their prefill
        # prompts may join a forward between blocks (`advance(admit=...)`, `GPT.forward`'s join)
        self._joinable = self.packed and "join" in params
        self.compiled: Any = None
        self.compile_seconds: float | None = None  # the first compiled step, compile included
        if compile:
            if (
                self.mode != "batched"
                or not callable(getattr(self.cache, "fixed_step", None))
                or "max_len" not in inspect.signature(model.new_cache).parameters
            ):
                raise ConfigError(
                    f"compile: {type(model).__name__} has no KV cache with a fixed-shape step "
                    "(`fixed_step`, `new_cache(max_len=...)`); decode it without compiling"
                )
            # one spare position: the attended slice of the cache (`_compiled_step`) is never
            # all of it, so the graph need not tell the two apart (a contiguity guard)
            self.cache = model.new_cache(
                max_rows, self.device, self.dtype, max_len=self.cache.max_len + 1
            )
            # a code object of its own: Dynamo keeps compiled graphs per code object, so this
            # engine never runs a graph another engine compiled (with that model's frozen
            # weights, possibly changed since), and its graphs are freed with it
            fn = DecodeEngine._fixed_step
            own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)
            step = types.MethodType(own, self)
            # static shapes but for the attended cache length (`_compiled_step`)
            self.compiled = torch.compile(step, fullgraph=True, dynamic=None)
            self._keys = torch.arange(self.cache.max_len, device=self.device)

    # ---------------------------------------------------------------------------------- state

    @property
    def active(self) -> int:
        """Rows being decoded."""
        return len(self.slots)

    @property
    def free(self) -> int:
        """Rows that can still be added."""
        return self.max_rows - len(self.slots)

    # -------------------------------------------------------------------------------- forward

    def _forward(self, idx: torch.Tensor, cache: Any) -> torch.Tensor:
        """Next-token logits (B, V) of idx (B, T), extending `cache` (None: no cache)."""
        if cache is None:
            out = self.model(idx)
        else:
            out = self.model(idx, cache=cache, **self._last_only)
        logits = out[0]
        if logits is None:
            raise TypeError("the model returned no logits; generation needs them (targets=None)")
        return logits[:, -1, :]

    def _logits_of(self, logits: torch.Tensor) -> torch.Tensor:
        """The (max_rows, V) float32 buffer of next-token logits, allocated on first use."""
        if self.logits is None:
            self.logits = torch.empty(
                self.max_rows, logits.shape[-1], device=logits.device, dtype=torch.float32
            )
        return self.logits

    def _set_logits(self, slot: int, logits: torch.Tensor) -> None:
        self._logits_of(logits)[slot : slot + logits.shape[0]] = logits

    def _fill(self, slot: int, ids: list[int]) -> torch.Tensor | None:
        """Start slot's cache afresh from `ids`; their last logits (None for no ids)."""
        if self.mode == "batched":
            cache = self.cache.rows(slot, slot + 1)
            cache.reset()
        elif self.mode == "per_row":
            cache = self.row_caches[slot]
            if callable(getattr(cache, "reset", None)):
                cache.reset()
            else:
                cache = self.row_caches[slot] = self.model.new_cache(1, self.device, self.dtype)
        else:
            cache = None
        if not ids:
            return None
        return self._forward(torch.tensor([ids], dtype=torch.long, device=self.device), cache)

    # -------------------------------------------------------------------------------- add rows

    @torch.no_grad()
    def add(
        self,
        prompt: Sequence[int],
        sampling: SamplingParams,
        generators: Sequence[torch.Generator | None],
        *,
        max_new_tokens: int,
        eos_id: int | None = None,
        first_index: int = 0,
    ) -> list[Row]:
        """Add one row per generator, all continuing `prompt` (prefilled once); returns them.

        The prompt is cropped to the model's window from the left (the caller warns).
        """
        request = Request(prompt, sampling, generators, max_new_tokens, eos_id, first_index)
        return self.add_many([request])[0]

    @torch.no_grad()
    def add_many(self, requests: Sequence[Request], *, defer: bool = False) -> list[list[Row]]:
        """`add` for several requests at once: prompts of equal length share one prefill forward.

        `defer` (an engine with packed steps, `self.packed`): run no forward now; the next
        `advance` prefills the prompts in the same forward as the other rows' next token. Rows
        can then be added at any time, also between `sample` and `advance`.
        """
        if defer and not self.packed:
            raise ValueError("deferred prefill needs packed steps (a GPT's cache, not compiled)")
        if self._unfed and not defer:
            raise RuntimeError("rows can be added only after advance()")
        total = sum(len(r.generators) for r in requests)
        if total > self.free:
            raise ValueError(f"{total} rows requested, {self.free} free of {self.max_rows}")
        prompts = []
        for r in requests:
            if r.max_new_tokens < 1:
                raise ValueError(f"max_new_tokens = {r.max_new_tokens}: expected >= 1")
            ids = [int(t) for t in r.prompt]
            if not ids:
                raise ValueError("the prompt has no tokens")
            prompts.append(ids[-self.block :] if self.block is not None else ids)
        # Slots: the first row of every request, shortest prompts first (equal lengths adjacent,
        # so they prefill together), then the further samples, which copy their first row.
        order = sorted(range(len(requests)), key=lambda i: len(prompts[i]))
        rows: list[list[Row]] = [[] for _ in requests]
        for k in (0, 1):
            for i in order:
                r = requests[i]
                gens = r.generators[:1] if k == 0 else r.generators[1:]
                for j, gen in enumerate(gens, start=k):
                    row = Row(
                        r.first_index + j,
                        r.sampling,
                        gen,
                        r.max_new_tokens,
                        r.eos_id,
                        len(r.prompt),
                        list(prompts[i]),
                    )
                    row.slot, row.cached = len(self.slots), len(prompts[i])
                    self.slots.append(row)
                    if self.mode == "per_row":
                        self.row_caches.append(self.model.new_cache(1, self.device, self.dtype))
                    rows[i].append(row)
        if defer:
            for group in rows:
                for row in group:
                    row.pending, row.source = True, group[0] if row is not group[0] else None
                    self.cache.lengths[row.slot] = 0
                    self._deferred += 1
            return rows
        try:
            self._prefill([rows[i][0] for i in order])
            for group in rows:
                first = group[0]
                for row in group[1:]:
                    if self.mode == "batched":
                        self.cache.copy_row(first.slot, row.slot)
                        self.logits[row.slot] = self.logits[first.slot]
                    else:  # separate caches cannot be copied: prefill each
                        self._set_logits(row.slot, self._fill(row.slot, row.context))
        except BaseException:
            for row in sorted((r for g in rows for r in g), key=lambda r: -r.slot):
                self.cancel(row)
            raise
        return rows

    def _prefill(self, firsts: list[Row]) -> None:
        """Prefill rows in adjacent slots; runs of equal length go through one forward."""
        i = 0
        while i < len(firsts):
            j = i + 1
            if self.mode == "batched":
                while j < len(firsts) and len(firsts[j].context) == len(firsts[i].context):
                    j += 1
            run = firsts[i:j]
            if len(run) == 1:
                self._set_logits(run[0].slot, self._fill(run[0].slot, run[0].context))
            else:
                cache = self.cache.rows(run[0].slot, run[-1].slot + 1)
                cache.reset()
                idx = torch.tensor([r.context for r in run], dtype=torch.long, device=self.device)
                self._set_logits(run[0].slot, self._forward(idx, cache))  # (R, T) -> (R, V)
            i = j

    # ------------------------------------------------------------------------------------ step

    def _sample(self, n: int) -> list[int]:
        rows = self.slots
        tok = sample_rows(self.logits[:n], [r.sampling for r in rows], [r.generator for r in rows])
        out = tok.tolist()  # the one host synchronisation of a step
        if min(out) < 0:
            raise GenerationError(
                "the model's next-token probabilities are not finite (NaN or inf) although its "
                "weights are"
            )
        return out

    def _retire(self, row: Row) -> None:
        """Free row's slot: the last row moves into it (cache row, logits and all)."""
        if row.pending:
            row.pending = False
            self._deferred -= 1
        slot, last = row.slot, len(self.slots) - 1
        if slot != last:
            moved = self.slots[last]
            if self.mode == "batched":
                self.cache.copy_row(last, slot)
            elif self.mode == "per_row":
                self.row_caches[slot] = self.row_caches[last]
            self.logits[slot] = self.logits[last]
            self.slots[slot], moved.slot = moved, slot
        self.slots.pop()
        if self.mode == "per_row":
            self.row_caches.pop()
        row.slot = -1
        if not self.slots:
            self._unfed = False  # nothing left to feed

    def cancel(self, row: Row) -> None:
        """Stop decoding `row` now (e.g. its client went away); call between steps."""
        if row.slot >= 0:
            row.finish_reason = row.finish_reason or "cancelled"
            self._retire(row)

    @torch.no_grad()
    def step(self) -> list[tuple[Row, int]]:
        """Sample one token for every active row and prepare the next; returns (row, token) pairs.

        `sample` then `advance`: rows that finish with this token (eos, or max_new_tokens
        reached) are retired and have `finish_reason` set; the others have their next logits
        computed in one batched forward.
        """
        out = self.sample()
        self.advance()
        return out

    @torch.no_grad()
    def sample(self) -> list[tuple[Row, int]]:
        """The first half of `step`: sample and retire, without the forward pass.

        A server calls it, hands the tokens on, then calls `advance`, so a token never waits
        for the forward that prepares the next one. Until `advance`, rows cannot be added.
        """
        if self._deferred:
            raise RuntimeError("rows added with defer await advance()")
        if self._unfed:
            raise RuntimeError("sample() called twice without advance()")
        n = len(self.slots)
        if n == 0:
            return []
        out = []
        for row, tok in zip(list(self.slots), self._sample(n), strict=True):
            row.tokens.append(tok)
            out.append((row, tok))
            if tok == row.eos_id:
                row.finish_reason = "stop"
            elif len(row.tokens) >= row.max_new_tokens:
                row.finish_reason = "length"
            else:
                row.context.append(tok)
                if self.block is not None and len(row.context) > self.block:
                    del row.context[: len(row.context) - self.block]
        for row in sorted((r for r, _ in out if r.done), key=lambda r: -r.slot):
            self._retire(row)
        self._unfed = bool(self.slots)
        return out

    @torch.no_grad()
    def advance(self, admit: Callable[[], None] | None = None) -> None:
        """The second half of `step`: one forward pass gives every row its next logits.

        `admit` (a server's): called before each block of the forward (a model whose forward
        takes `join`, with packed steps) until it adds rows; the prompts it adds with
        `add_many(..., defer=True)` join the forward there, running the blocks before on their
        own, so a request that arrives while a forward runs gets its first token from that
        forward. Requests arriving after that join wait for the next forward.
        """
        if (self._unfed or self._deferred) and self.slots:
            self._advance(admit if self._joinable else None)
        self._unfed = False

    def _advance(self, admit: Callable[[], None] | None) -> None:
        """Feed every active row its newest token; leaves the next logits in `self.logits`."""
        n = len(self.slots)
        if self.mode == "recompute":
            for row in self.slots:
                self._set_logits(row.slot, self._fill(row.slot, row.context))
            return
        if self.packed and (
            self._deferred
            or (self.block is not None and any(r.cached >= self.block for r in self.slots))
        ):
            self._advance_packed(admit)
            return
        for row in self.slots:  # a full cache restarts from the most recent tokens
            if self.block is not None and row.cached >= self.block:
                self._fill(row.slot, row.context[-self.keep : -1])
                row.cached = self.keep - 1
            row.cached += 1
        if self.compiled is not None:
            self._set_logits(0, self._compiled_step([r.context[-1] for r in self.slots]))
            return
        feed = torch.tensor(
            [r.context[-1] for r in self.slots], dtype=torch.long, device=self.device
        )[:, None]  # (n, 1)
        if self.mode == "batched":
            cache = self.cache if n == self.max_rows else self.cache.rows(0, n)
            if admit is not None and n < self.max_rows:
                flight = [(r, r.cached - 1, r.context[-1:]) for r in self.slots]
                self._joined_forward(feed, cache, flight, admit)
            else:
                self._set_logits(0, self._forward(feed, cache))
        else:
            for row in self.slots:
                cache = self.row_caches[row.slot]
                self._set_logits(row.slot, self._forward(feed[row.slot : row.slot + 1], cache))

    def _advance_packed(self, admit: Callable[[], None] | None = None) -> None:
        """One packed forward: each sampled row's newest token, each deferred prompt (further
        samples of a prompt copy its first row afterwards) and each full row's refilled window
        (its most recent `keep` tokens, from position 0)."""
        singles: list[Segment] = []
        longer: list[Segment] = []
        for row in self.slots:
            if row.pending:
                if row.source is None or row.source.slot < 0:
                    longer.append((row, 0, row.context))
            elif self._unfed:
                if self.block is not None and row.cached >= self.block:
                    longer.append((row, 0, row.context[-self.keep :]))
                else:
                    singles.append((row, row.cached, row.context[-1:]))
        segments = singles + longer
        step = self.cache.packed_step([(r.slot, st, len(t)) for r, st, t in segments])
        idx = torch.tensor([[t for _, _, ts in segments for t in ts]], device=self.device)
        self._joined_forward(idx, step, segments, admit)

    def _joined_forward(
        self,
        idx: torch.Tensor,
        cache: Any,
        flight: list[Segment],
        admit: Callable[[], None] | None,
    ) -> None:
        """The forward of `flight` (rows, first positions, tokens) as idx (1, N) over a packed
        step, or as a decoding step (n, 1), which the prompts `admit` adds before one of its
        blocks join; sets the logits of every row in it, then of the further samples, which
        copy their first row."""
        joined = False

        def join(layer: int) -> tuple[torch.Tensor, Any, Any] | None:
            # once per forward: every later joiner would delay the rows in flight (the ones
            # that joined before included) by its prompt's run through the blocks before, so
            # later arrivals wait for the next forward, which packs them from the first block
            nonlocal joined
            if joined:
                return None
            waiting = self._deferred
            admit()  # type: ignore[misc]
            if self._deferred == waiting:  # nothing was added
                return None
            inside = {id(r) for r, _, _ in flight}
            new = [
                (r, 0, r.context)
                for r in self.slots
                if r.pending and id(r) not in inside and (r.source is None or r.source.slot < 0)
            ]
            if not new:
                return None
            joined = True
            flight.extend(new)
            alone = self.cache.packed_step([(r.slot, 0, len(t)) for r, _, t in new])
            step = self.cache.packed_step([(r.slot, st, len(t)) for r, st, t in flight])
            ids = torch.tensor([[t for _, _, ts in new for t in ts]], device=self.device)
            return ids, alone, step

        extra = {"join": join} if admit is not None else {}
        out = self.model(idx, cache=cache, last_only=True, **extra)[0]  # (1, R, V) or (n, 1, V)
        if out is None:
            raise TypeError("the model returned no logits; generation needs them (targets=None)")
        if idx.shape[0] > 1 and not joined:  # a decoding step (n, 1) that nothing joined
            self._set_logits(0, out[:, -1])
            return
        slots = torch.tensor([r.slot for r, _, _ in flight], device=self.device)
        self._logits_of(out)[slots] = out[0].float()
        for r, st, ts in flight:
            r.cached, r.pending = st + len(ts), False
        for row in self.slots:
            if row.pending:  # a further sample: its first row is prefilled now
                self.cache.copy_row(row.source.slot, row.slot)
                self.logits[row.slot] = self.logits[row.source.slot]
                row.cached, row.pending = row.source.cached, False
            row.source = None
        self._deferred = 0

    def _fixed_step(self, idx: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Logits (max_rows, V) of one token per row at positions pos (max_rows,) attending to
        cache positions `keys` (0..S-1): compiled."""
        return self._forward(idx, self.cache.fixed_step(pos, keys))

    def _compile_settings(self) -> dict[str, Any]:
        if self.device.type != "cpu":
            return dict(COMPILE_SETTINGS)
        low = self.dtype in (torch.bfloat16, torch.float16)
        return {
            **COMPILE_SETTINGS,
            **CPU_COMPILE_SETTINGS,
            **(CPU_LOW_PRECISION_COMPILE_SETTINGS if low else {}),
        }

    def _compiled_step(self, tokens: list[int]) -> torch.Tensor:
        """The compiled step for the first n rows (`tokens`); the free rows ride along at position
        0 (their slots are prefilled from position 0 before they are used again)."""
        n = len(tokens)
        idx = torch.tensor(tokens + [0] * (self.max_rows - n), dtype=torch.long)[:, None]
        pos = self.cache.lengths.clone()
        pos[n:] = 0
        idx, pos = idx.to(self.device), pos.to(self.device)
        # attention reads the cache up to the longest row (>= 2 positions: Dynamo specialises a
        # length of 1), through one graph whatever that length (`keys` marked dynamic below)
        keys = self._keys[: max(int(self.cache.lengths[:n].max()) + 1, 2)]
        if self.compile_seconds is not None:
            # Guards are not evaluated: after its compile the step is only ever called as here
            # (the same tensors' shapes, dtypes and devices, a span within the dynamic range,
            # this engine's cache and frozen model, no_grad), so they could not fail; this
            # saves their evaluation, a few tenths of a millisecond a step on a CPU. A step that
            # would need a recompile fails instead of compiling anew.
            with torch.compiler.set_stance("fail_on_recompile", skip_guard_eval_unsafe=True):
                logits = self.compiled(idx, pos, keys)
        else:
            torch._dynamo.mark_dynamic(keys, 0, min=2, max=len(self._keys) - 1)
            t0 = time.perf_counter()
            try:
                # a step that would need more recompiles than Dynamo keeps fails instead of
                # running eagerly behind the caller's back
                with (
                    torch._dynamo.config.patch(fail_on_recompile_limit_hit=True),
                    torch._inductor.config.patch(self._compile_settings()),
                ):
                    logits = self.compiled(idx, pos, keys)
            except Exception as e:  # Dynamo / Inductor / the C++ compiler
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise ConfigError(
                    f"compile: torch.compile of the decode step failed ({type(e).__name__}: "
                    f"{first}); decode without compiling"
                ) from e
            self.compile_seconds = time.perf_counter() - t0
        self.cache.lengths[:n] += 1
        return logits[:n]


__all__ = ["DecodeEngine", "Request", "Row", "model_device_dtype"]
