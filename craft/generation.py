"""Sampling text from a model: prompt encoding, batched KV-cached decoding, streaming.

The CLI (`craft generate`), the server (`craft serve`) and the training sample callback all
decode with `craft.engine.DecodeEngine`: one prefill of the prompt (logits of the last position
only), then one batched forward per token for all samples together. `iter_tokens` yields one
token per row and step; `craft.sampling` turns logits into tokens (sample i of a run with seed s
draws from its own generator, so the N samples of one batched run equal N separate runs); the
tokenizer's incremental decoder turns the token stream into text pieces that are safe to print
as they arrive (no half UTF-8 characters, SentencePiece spaces kept).

Context window (models with a `block_size`): a prompt longer than the window is cropped from the
left with a warning. When a row's KV cache is full, its last `refill_tokens` tokens (default
three quarters of the window) are prefilled into its fresh cache row and decoding continues one
token per step. The next tokens therefore see between `refill_tokens` and `block_size` tokens of
context, so the re-prefill happens once every `block_size - refill_tokens` tokens instead of at
every step; `refill_tokens=block_size` reproduces cropping to the last `block_size` tokens at
every step exactly, at the cost of a full forward per token.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch

from craft.engine import DecodeEngine, model_device_dtype
from craft.errors import ConfigError, TokenizerError
from craft.sampling import (  # re-exported: the sampling API lived here first
    SamplingParams,
    filter_logits,
    row_generator,
    sample_next,
    sample_rows,
    sample_seed,
)

log = logging.getLogger("craft.generation")


# ------------------------------------------------------------------------------------- decoding


def iter_tokens(
    model: torch.nn.Module,
    idx: torch.Tensor,
    *,
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    refill_tokens: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,) int64, up to `max_new_tokens` times.

    idx (B, T) int64 on the model's device, T >= 1; rows longer than the model's window are
    cropped from the left. The rows draw from `generator` in turn (one stream for the batch; with
    one row and `row_generator(seed, 0)` this is what `generate` does with `seed`). Stops
    early once every row has produced `eos_id` (the eos token is yielded; rows that finished
    earlier keep yielding `eos_id`). `use_cache=False` recomputes the last `block_size` tokens at
    every step (the reference the cache is checked against); a model without `new_cache` (a
    plugin that implements no cache) is always run that way. The caller puts the model in eval
    mode (dropout off); `generate` does.
    """
    if idx.dim() != 2 or idx.shape[1] < 1:
        raise ValueError(f"idx must be (B, T) with T >= 1, got shape {tuple(idx.shape)}")
    return _iter_tokens(
        model,
        idx,
        max_new_tokens,
        sampling or SamplingParams(),
        generator,
        eos_id,
        use_cache,
        refill_tokens,
    )


def _iter_tokens(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingParams,
    generator: torch.Generator | None,
    eos_id: int | None,
    use_cache: bool,
    refill_tokens: int | None,
) -> Iterator[torch.Tensor]:
    if max_new_tokens <= 0:
        return
    batch = idx.shape[0]
    engine = DecodeEngine(model, batch, use_cache=use_cache, refill_tokens=refill_tokens)
    for b, prompt in enumerate(idx.tolist()):
        engine.add(
            prompt,
            sampling,
            [generator],
            max_new_tokens=max_new_tokens,
            eos_id=eos_id,
            first_index=b,
        )
    last = torch.full((batch,), -1 if eos_id is None else eos_id, dtype=torch.long)
    while engine.active:
        nxt = last.clone()
        for row, tok in engine.step():
            nxt[row.index] = tok
        yield nxt.to(idx.device)


# ---------------------------------------------------------------------------------- prompt + API


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of `prompt`; an empty prompt starts from the start token, else from a newline.

    Characters a vocabulary cannot encode are the tokenizer's TokenizerError (the char tokenizer
    lists all of them), prefixed with "prompt: ".
    """
    if prompt == "":
        if getattr(tokenizer, "bos_id", None) is not None:
            return [int(tokenizer.bos_id)]
        try:
            ids = list(tokenizer.encode("\n"))
        except TokenizerError:
            ids = []
        if not ids:
            raise TokenizerError(
                "empty prompt: the tokenizer has no start token and cannot encode a newline; "
                "give a non-empty prompt"
            )
        return ids
    try:  # prompt_ids: encode plus the special tokens the tokenizer adds (e.g. a Llama bos)
        ids = list(getattr(tokenizer, "prompt_ids", tokenizer.encode)(prompt))
    except TokenizerError as e:
        raise TokenizerError(f"prompt: {e.message}") from None
    if not ids:
        raise TokenizerError(f"prompt {prompt[:40]!r} encodes to no tokens")
    return ids


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu. Asking for an absent cuda is a ConfigError."""
    name = "auto" if device is None else str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device = {name!r}: expected auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device = {name!r}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device = {name!r}: expected auto, cpu or cuda")
    return dev


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or a torch dtype) -> torch dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype = {dtype!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def crop_prompt(ids: list[int], block_size: int | None) -> list[int]:
    """The last `block_size` ids, warning when the prompt had to be cropped."""
    if block_size is not None and len(ids) > block_size:
        log.warning(
            "prompt has %d tokens, more than the model's context of %d; "
            "keeping the last %d (cropped from the left)",
            len(ids),
            block_size,
            block_size,
        )
        return ids[-block_size:]
    return ids


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    num_samples: int = 1,
    device: str | torch.device | None = None,
    on_text: Callable[[int, str], None] | None = None,
    use_cache: bool = True,
    first_sample: int = 0,
    compile: bool = False,
) -> list[str]:
    """Sample `num_samples` continuations of `prompt`, decoded as one batch; returns their text.

    The returned text excludes the prompt and the end-of-sequence token. `on_text(i, piece)` is
    called with each piece of sample i as soon as it is final (streaming): sample 0 streams live,
    and the pieces of sample i+1 (decoded alongside) follow once sample i is complete, so the
    pieces of each sample are contiguous and concatenate to its returned text. `device=None`
    keeps the model where it is. Sample i draws from its own generator, seeded with
    `sample_seed(seed, first_sample + i)`: the samples of one run equal separate runs of one
    sample each with `first_sample` = 0, 1, ... (a server request with `n` samples does the same).
    `compile` runs the decode step through `torch.compile` (see `craft.engine.DecodeEngine`).
    """
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens = {max_new_tokens}: expected an integer >= 0")
    if num_samples < 1:
        raise ConfigError(f"num_samples = {num_samples}: expected an integer >= 1")
    if seed is not None and not 0 <= seed < 2**64:
        raise ConfigError(f"seed = {seed}: expected an integer from 0 to 2**64 - 1")
    sampling = SamplingParams(temperature, top_k, top_p)
    if device is not None:
        model.to(resolve_device(device))
    dev, _ = model_device_dtype(model)
    if seed is None:  # drawn from the OS, so the global RNG streams stay untouched
        seed = random.SystemRandom().randrange(2**62)
    ids = crop_prompt(encode_prompt(tokenizer, prompt), getattr(model, "block_size", None))
    if max_new_tokens == 0:
        return [""] * num_samples
    eos_id = getattr(tokenizer, "eos_id", None)
    stream = OrderedStream(num_samples, on_text)
    decoders = []
    for _ in range(num_samples):
        decoder = tokenizer.decoder()
        decoder.push(ids)  # the prompt is context: the first piece gets its word boundary
        decoders.append(decoder)

    was_training = model.training
    model.eval()
    try:
        engine = DecodeEngine(model, num_samples, use_cache=use_cache, compile=compile)
        gens = [row_generator(seed, first_sample + i, dev) for i in range(num_samples)]
        engine.add(ids, sampling, gens, max_new_tokens=max_new_tokens, eos_id=eos_id)
        while engine.active:
            for row, tok in engine.step():
                i = row.index
                if tok != eos_id:
                    stream.emit(i, decoders[i].push([tok]))
                if row.done:
                    stream.emit(i, decoders[i].flush())
                    stream.finish(i)
    finally:
        model.train(was_training)
    return stream.texts()


class OrderedStream:
    """Hands text pieces of samples 0, 1, ... on in sample order, holding back later samples."""

    def __init__(self, n: int, on_text: Callable[[int, str], None] | None) -> None:
        self.pieces: list[list[str]] = [[] for _ in range(n)]
        self.finished = [False] * n
        self.current = 0  # the sample streamed live
        self.sent = 0  # pieces of the current sample already handed on
        self.on_text = on_text

    def emit(self, i: int, piece: str) -> None:
        if piece:
            self.pieces[i].append(piece)
            self._flush()

    def finish(self, i: int) -> None:
        self.finished[i] = True
        self._flush()

    def _flush(self) -> None:
        while self.current < len(self.pieces):
            pieces = self.pieces[self.current]
            if self.on_text is not None:
                for piece in pieces[self.sent :]:
                    self.on_text(self.current, piece)
            self.sent = len(pieces)
            if not self.finished[self.current]:
                return
            self.current += 1
            self.sent = 0

    def texts(self) -> list[str]:
        return ["".join(p) for p in self.pieces]


__all__ = [
    "DTYPES",
    "OrderedStream",
    "SamplingParams",
    "crop_prompt",
    "encode_prompt",
    "filter_logits",
    "generate",
    "iter_tokens",
    "resolve_device",
    "resolve_dtype",
    "row_generator",
    "sample_next",
    "sample_rows",
    "sample_seed",
]
