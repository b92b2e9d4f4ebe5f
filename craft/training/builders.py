"""Build the model and the data module of a config through the component registry."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from craft.config import registry
from craft.errors import ConfigError


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def build_model(
    cfg: Any, vocab_size: int, *, fused_loss: bool = False, kernels: Any = None
) -> torch.nn.Module:
    """The model of `cfg.model` for `vocab_size` tokens (`cfg.model.vocab_size` wins when set).

    `fused_loss` is passed to builders that take it; asking a builder that does not is an error.
    `kernels` (the `kernels` section) gives the model its own backend table when its builder
    takes one; a builder that does not gets the selection as the process default instead (its
    model calls the module-level `craft.ops` functions). None keeps every op on `auto`.
    """
    declared = getattr(cfg.model, "vocab_size", None)
    if isinstance(declared, int) and declared < vocab_size:
        raise ConfigError(
            f"model.vocab_size = {declared}: smaller than the tokenizer's vocabulary of "
            f"{vocab_size} ids (its ids would index past the embedding); unset it or use at "
            f"least {vocab_size}"
        )
    fn = registry.get("model", cfg.model.type).build_fn()
    kw: dict[str, Any] = {}
    if _accepts(fn, "fused_loss"):
        kw["fused_loss"] = fused_loss
    elif fused_loss:
        raise ConfigError(
            f"kernels.fused_loss = true: model type {cfg.model.type!r} does not support a fused loss"
        )
    if kernels is not None:
        if _accepts(fn, "kernels"):
            kw["kernels"] = kernels
        else:
            from craft import ops

            ops.configure(kernels)
    return fn(cfg.model, vocab_size, **kw)


def build_start_model(
    cfg: Any,
    vocab_size: int,
    tokenizer: Any,
    *,
    fused_loss: bool,
    pretrained: bool,
    kernels: Any = None,
) -> torch.nn.Module:
    """The model a run starts from: `build_model`, then with `pretrained` (a new run, not a
    resume) the weights of `model.init_from` when the config names one."""
    model = build_model(cfg, vocab_size, fused_loss=fused_loss, kernels=kernels)
    if pretrained and getattr(cfg.model, "init_from", None):
        from craft.training.pretrained import load_init_weights

        load_init_weights(cfg, model, tokenizer)
    return model


def describe_model(cfg: Any, model: torch.nn.Module, vocab_size: int) -> str:
    """`gpt, 1,234 parameters, vocab 65, block 256` for the log."""
    if hasattr(model, "num_params"):
        n = model.num_params()
    else:
        n = sum(p.numel() for p in model.parameters())
    block = getattr(cfg.model, "block_size", "-")
    return f"{cfg.model.type}, {n:,} parameters, vocab {vocab_size}, block {block}"


def model_block_size(cfg: Any) -> int:
    """Training window length: `model.block_size` (every sequence model config has one)."""
    block = getattr(cfg.model, "block_size", None)
    if not isinstance(block, int) or block < 1:
        raise ConfigError(
            f"model.block_size: model type {cfg.model.type!r} needs a positive block_size for training"
        )
    return block


def build_data(
    cfg: Any, *, rank: int, world_size: int, is_main: bool, wait: Callable[[], None]
) -> Any:
    """The DataModule of `cfg.data` / `cfg.tokenizer` (prepares a named source on first use)."""
    return registry.build(
        "data",
        cfg.data,
        cfg.tokenizer,
        block_size=model_block_size(cfg),
        rank=rank,
        world_size=world_size,
        is_main=is_main,
        wait=wait,
    )
