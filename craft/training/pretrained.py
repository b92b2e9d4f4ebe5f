"""`model.init_from`: start a run from pretrained weights instead of a random initialisation.

The source is a Craft run, checkpoint or export directory, or a Hugging Face model directory or Hub
id. Only the weights are taken; optimizer, step, schedule and data position start fresh.

`resolve_pretrained(cfg)` fills the `model` section from the source, so a recipe never restates the
pretrained shape: keys the recipe sets win, but only when every weight keeps its shape (dropout,
norm_eps, a shorter block_size for learned positions, whose table is then cropped, ...);
otherwise the error names the tensors and the keys. The tokenizer section becomes the source's
tokenizer unless the recipe sets one. `load_init_weights` copies the weights into the model the
trainer built.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from craft.errors import CheckpointError, ConfigError

log = logging.getLogger("craft.training")

# Settings that keep the weight shapes but change what the weights compute: overriding them is
# allowed and announced.
_SEMANTIC = ("mlp", "norm", "norm_eps", "positions", "rope_theta")


@dataclass
class Source:
    """What `model.init_from` names, opened: its model section and tokenizer section."""

    name: str
    values: dict[str, Any]
    tokenizer: dict[str, Any] | None
    checkpoint: Path | None = None  # a Craft checkpoint/export directory
    pretrained: Any = None  # craft.interop.hf.Pretrained for an HF model


def open_source(name: str) -> Source:
    from craft.config import to_dict
    from craft.interop.hf import is_hf_source, open_pretrained
    from craft.training import checkpoint as ckpt

    if is_hf_source(name):
        pre = open_pretrained(name)
        tok = {"type": "hf", "path": name} if pre.has_tokenizer() else None
        return Source(name, dict(pre.values), tok, pretrained=pre)
    ck = ckpt.resolve_checkpoint(name)
    saved = ckpt.read_config(ck)
    values = {k: v for k, v in to_dict(saved.model).items() if k != "init_from"}
    shapes = ckpt.weight_shapes(ck / "model.safetensors")
    if "wte.weight" in shapes:
        values["vocab_size"] = shapes["wte.weight"][0]
    tok_type = saved.tokenizer.type
    tok_dir = ck / "tokenizer"
    if not tok_dir.is_dir():
        tok = None
    elif tok_type == "sentencepiece":
        tok = {"type": "sentencepiece", "model": str(tok_dir)}
    elif tok_type == "hf":
        tok = {"type": "hf", "path": str(tok_dir)}
    else:  # char / bytes: same settings; the built tokenizer is checked against the saved one
        tok = to_dict(saved.tokenizer)
    return Source(name, values, tok, checkpoint=ck)


def param_shapes(model_cfg: Any, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Shapes of every weight of the GPT a model config describes (built without memory)."""
    from craft.models.gpt import GPT

    with torch.device("meta"):
        model = GPT(model_cfg, vocab_size)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def resolve_pretrained(cfg: Any) -> Any:
    """`cfg` with the model (and, when not set, tokenizer) section filled from `model.init_from`."""
    from craft.config import registry
    from craft.config.components import GPTConfig

    src = getattr(cfg.model, "init_from", None)
    if not src:
        return cfg
    where = f"model.init_from = {src!r}"
    source = open_source(src)
    if source.pretrained is not None:
        source.pretrained.check_weights()
    if source.values.get("type") != "gpt":
        raise ConfigError(
            f"{where}: holds a {source.values.get('type')} model; init_from takes GPT weights"
        )
    explicit = {k: getattr(cfg.model, k) for k in cfg.model.model_fields_set}
    explicit.pop("type", None)
    merged = {**source.values, **explicit, "init_from": src}
    try:
        model_cfg = GPTConfig(**merged)
    except ValueError as e:
        raise ConfigError(f"{where}: the model section does not fit the source: {e}") from None
    vocab = source.values["vocab_size"]
    if model_cfg.vocab_size is None:
        raise ConfigError(f"{where}: the source does not record its vocabulary size")
    before = param_shapes(GPTConfig(**source.values), vocab)
    after = param_shapes(model_cfg, model_cfg.vocab_size)
    changed = [
        f"{k} {before.get(k, 'absent')} -> {after.get(k, 'absent')}"
        for k in sorted(set(before) | set(after))
        if before.get(k) != after.get(k) and not _cropped(k, before.get(k), after.get(k))
    ]
    if changed:
        keys = [
            k for k in sorted(explicit) if k != "init_from" and explicit[k] != source.values.get(k)
        ]
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise ConfigError(
            f"{where}: the recipe changes the shapes of pretrained weights: "
            f"{'; '.join(changed[:3])}{more} (set by model.{', model.'.join(keys) or '?'}; "
            "only settings that keep every shape, such as dropout, may differ from the source)"
        )
    for key in _SEMANTIC:
        if key in explicit and explicit[key] != source.values.get(key):
            log.warning(
                "%s: model.%s = %r differs from the pretrained %r; the weights were trained "
                "with the other",
                where,
                key,
                explicit[key],
                source.values.get(key),
            )
    update: dict[str, Any] = {"model": model_cfg}
    if not cfg.tokenizer.model_fields_set:
        if source.tokenizer is None:
            raise ConfigError(
                f"{where}: the source has no tokenizer files; set the [tokenizer] section"
            )
        tok_cls = registry.get("tokenizer", source.tokenizer["type"]).config_cls
        update["tokenizer"] = tok_cls(**source.tokenizer)
    return cfg.model_copy(update=update)


def _cropped(name: str, before: Any, after: Any) -> bool:
    """A learned position table cut to a shorter block_size (its first rows are kept)."""
    return (
        name == "wpe.weight"
        and before is not None
        and after is not None
        and after[1:] == before[1:]
        and after[0] <= before[0]
    )


def load_init_weights(cfg: Any, model: torch.nn.Module, tokenizer: Any) -> None:
    """Copy the weights of `cfg.model.init_from` into `model` (built from the resolved config)."""
    from craft.interop.hf import check_vocab

    src = cfg.model.init_from
    source = open_source(src)
    where = f"model.init_from = {src!r}"
    if source.pretrained is not None:
        check_vocab(tokenizer, model.vocab_size, where)
        source.pretrained.load_into(model)
    else:
        _load_craft(source.checkpoint, model, tokenizer, where)
    log.info("initialised the weights from %s", src)


def _load_craft(ck: Path, model: torch.nn.Module, tokenizer: Any, where: str) -> None:
    from craft.data.tokenizers import load_tokenizer
    from craft.training.checkpoint import load_model_weights

    if tokenizer is not None and (ck / "tokenizer").is_dir():
        saved = load_tokenizer(ck / "tokenizer")
        if saved.type != tokenizer.type or saved.artifact() != tokenizer.artifact():
            raise ConfigError(
                f"{where}: the data's {tokenizer.type} tokenizer ({tokenizer.vocab_size} ids) is "
                f"not the source's {saved.type} tokenizer ({saved.vocab_size} ids); the ids would "
                "mean other text (a char tokenizer learns its vocabulary from the data)"
            )
    state = load_model_weights(ck / "model.safetensors")
    expected = model.state_dict()
    if "wpe.weight" in state and "wpe.weight" in expected:
        state["wpe.weight"] = state["wpe.weight"][: expected["wpe.weight"].shape[0]]
    bad = sorted(set(expected) ^ set(state)) or [
        k for k in expected if tuple(expected[k].shape) != tuple(state[k].shape)
    ]
    if bad:
        raise CheckpointError(f"{where}: weights do not fit the model ({', '.join(bad[:3])})")
    model.load_state_dict(state, strict=True)
