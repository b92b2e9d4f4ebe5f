"""Sampling text from a model: prompt encoding, KV-cached decoding, sampling filters, streaming.

The CLI (`craft generate`) and the training sample callback both call `generate`. Lower layers:
`iter_tokens` yields one token per step (GPT: one prefill of the prompt, then one token per forward
through the KV cache; recurrent models: the hidden state is the cache), `sample_next` turns logits
into a token, and the tokenizer's incremental decoder turns the token stream into text pieces that
are safe to print as they arrive (no half UTF-8 characters, SentencePiece spaces kept).

Context window (models with a `block_size`): a prompt longer than the window is cropped from the
left with a warning. When the KV cache is full, the last `refill_tokens` tokens (default three
quarters of the window) are prefilled into a fresh cache and decoding continues one token per step.
The next tokens therefore see between `refill_tokens` and `block_size` tokens of context, so the
re-prefill happens once every `block_size - refill_tokens` tokens instead of at every step;
`refill_tokens=block_size` reproduces cropping to the last `block_size` tokens at every step
exactly, at the cost of a full forward per token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from craft.errors import ConfigError, TokenizerError

log = logging.getLogger("craft.generation")


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature 0 is greedy (top_k/top_p are then irrelevant)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ConfigError(
                f"temperature = {self.temperature}: expected a number >= 0 (0 means greedy)"
            )
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k = {self.top_k}: expected an integer >= 1")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p = {self.top_p}: expected a number in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# ------------------------------------------------------------------------------------- sampling


def filter_logits(
    logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Set the logits outside the top-k, then outside the top-p nucleus, to -inf.

    logits (B, V). Top-p keeps, per row, the smallest set of most probable tokens whose total
    probability reaches `top_p` (always at least one token).
    """
    out = logits
    vocab = logits.shape[-1]
    if top_k is not None and top_k < vocab:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]  # (B, 1)
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more probable tokens
        drop_sorted = before >= top_p  # the set already reached top_p without this token
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token of each row: logits (B, V) -> (B,) int64. temperature 0 is argmax."""
    params = SamplingParams(temperature, top_k, top_p)
    logits = logits.float()
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ------------------------------------------------------------------------------------- decoding


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _last_logits(out: Any) -> torch.Tensor:
    logits = out[0]
    if logits is None:
        raise TypeError("the model returned no logits; generation needs them (targets=None)")
    return logits[:, -1, :]  # (B, V)


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
    cropped from the left. Stops early once every row has produced `eos_id` (the eos token is
    yielded; rows that finished earlier keep yielding `eos_id`). `use_cache=False` recomputes the
    last `block_size` tokens at every step (the reference the cache is checked against); a model
    without `new_cache` (a plugin that implements no cache) is always run that way.
    The caller puts the model in eval mode (dropout off); `generate` does.
    """
    return _iter_tokens(
        model,
        idx,
        max_new_tokens=max_new_tokens,
        sampling=sampling or SamplingParams(),
        generator=generator,
        eos_id=eos_id,
        use_cache=use_cache and callable(getattr(model, "new_cache", None)),
        refill_tokens=refill_tokens,
    )


@torch.no_grad()
def _iter_tokens(
    model: torch.nn.Module,
    idx: torch.Tensor,
    *,
    max_new_tokens: int,
    sampling: SamplingParams,
    generator: torch.Generator | None,
    eos_id: int | None,
    use_cache: bool,
    refill_tokens: int | None,
) -> Iterator[torch.Tensor]:
    if idx.dim() != 2 or idx.shape[1] < 1:
        raise ValueError(f"idx must be (B, T) with T >= 1, got shape {tuple(idx.shape)}")
    if max_new_tokens <= 0:
        return
    block: int | None = getattr(model, "block_size", None)
    if block is not None:
        idx = idx[:, -block:]
        keep = block * 3 // 4 if refill_tokens is None else refill_tokens
        if not 1 <= keep <= block:
            raise ValueError(f"refill_tokens = {keep}: expected 1..block_size ({block})")
    device, dtype = _model_device_dtype(model)
    batch = idx.shape[0]
    seq = idx  # (B, T) the tokens so far, trimmed to the window the model may still need
    finished = torch.zeros(batch, dtype=torch.bool, device=idx.device)

    cache = None
    filled = 0  # tokens held by the cache
    if use_cache:
        cache = model.new_cache(batch, device, dtype)
        logits = _last_logits(model(seq, cache=cache))
        filled = seq.shape[1]

    for step in range(max_new_tokens):
        if not use_cache:
            window = seq if block is None else seq[:, -block:]
            logits = _last_logits(model(window))
        nxt = sample_next(
            logits, sampling.temperature, sampling.top_k, sampling.top_p, generator
        )  # (B,)
        if eos_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
            finished |= nxt == eos_id
        yield nxt
        if step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
            return
        if block is not None or not use_cache:  # a recurrent cache needs no token history
            seq = torch.cat([seq, nxt[:, None]], dim=1)  # (B, T+1)
            if block is not None:
                seq = seq[:, -block:]
        if use_cache:
            if block is not None and filled >= block:
                # The cache is full: refill it from the most recent `keep` tokens.
                if callable(getattr(cache, "reset", None)):
                    cache.reset()  # reuses the memory
                else:
                    cache = model.new_cache(batch, device, dtype)
                logits = _last_logits(model(seq[:, -keep:], cache=cache))
                filled = keep
            else:
                logits = _last_logits(model(nxt[:, None], cache=cache))
                filled += 1


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
) -> list[str]:
    """Sample `num_samples` continuations of `prompt`; returns the generated text of each.

    The returned text excludes the prompt and the end-of-sequence token. `on_text(i, piece)` is
    called with each piece of sample i as soon as it is final (streaming); the pieces of a sample
    concatenate to its returned text. `device=None` keeps the model where it is. Samples are drawn
    one after another from one generator seeded with `seed`, so a seed fixes all of them.
    """
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens = {max_new_tokens}: expected an integer >= 0")
    if num_samples < 1:
        raise ConfigError(f"num_samples = {num_samples}: expected an integer >= 1")
    sampling = SamplingParams(temperature, top_k, top_p)
    if device is not None:
        model.to(resolve_device(device))
    dev, _ = _model_device_dtype(model)
    was_training = model.training
    model.eval()

    ids = crop_prompt(encode_prompt(tokenizer, prompt), getattr(model, "block_size", None))
    idx = torch.tensor([ids], dtype=torch.long, device=dev)  # (1, T)
    gen = torch.Generator(device=dev)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    eos_id = getattr(tokenizer, "eos_id", None)

    texts: list[str] = []
    try:
        for i in range(num_samples):
            decoder = tokenizer.decoder()
            decoder.push(ids)  # the prompt is context: the first piece gets its word boundary
            pieces: list[str] = []

            def emit(piece: str, i: int = i, pieces: list[str] = pieces) -> None:
                if piece:
                    pieces.append(piece)
                    if on_text is not None:
                        on_text(i, piece)

            for tok in iter_tokens(
                model,
                idx,
                max_new_tokens=max_new_tokens,
                sampling=sampling,
                generator=gen,
                eos_id=eos_id,
                use_cache=use_cache,
            ):
                t = int(tok[0])
                if t == eos_id:
                    break
                emit(decoder.push([t]))
            emit(decoder.flush())
            texts.append("".join(pieces))
    finally:
        model.train(was_training)
    return texts


__all__ = [
    "DTYPES",
    "SamplingParams",
    "crop_prompt",
    "encode_prompt",
    "filter_logits",
    "generate",
    "iter_tokens",
    "resolve_device",
    "resolve_dtype",
    "sample_next",
]
