"""Parameter counts, training FLOPs per token and memory estimates of a model.

`describe(model_cfg, vocab_size)` gets them from the config alone: arithmetically for models whose
module defines `param_counts(cfg, vocab_size)` (GPT, RNN), so any size (even one that would not
fit in memory) is described at once, else from the model built on the meta device. The functions
below take either that description or a built model.

FLOPs per token of training follow the formula nanoGPT and torchtitan use for MFU (Kaplan et al.
2020, appendix; PaLM appendix B): 6N + 12 * L * H * hs * T, where N counts the parameters that
take part in a matmul (so the token embedding only when it is tied to the output layer, and never
the position embedding) and the second term is attention's q.k and attention.v products
(forward 4 * L * H * hs * T, backward twice that), without discounting the causal mask.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from craft.models.gpt import GPT, mlp_hidden_size
from craft.models.rnn import RNNLM

PRECISION_BYTES = {"no": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class ParamCounts:
    total: int  # every parameter once (tied weights once)
    embedding: int  # lookup tables: token and position embeddings
    non_embedding: int  # total - embedding
    matmul: int  # N of the FLOPs formula: parameters used in a matmul (tied output layer included)


@dataclass(frozen=True)
class ModelSize:
    """What the estimates need to know of a model, without building it."""

    config: Any  # the model section
    vocab_size: int
    counts: ParamCounts


def param_counts(model_cfg: Any, vocab_size: int) -> ParamCounts | None:
    """Counts by arithmetic when the model's module defines `param_counts(cfg, vocab_size)`."""
    from craft.config import registry

    builder = registry.get("model", model_cfg.type).build_fn()
    module = sys.modules.get(getattr(builder, "__module__", ""), None)
    counter = getattr(module, "param_counts", None)
    return counter(model_cfg, vocab_size) if callable(counter) else None


def describe(model_cfg: Any, vocab_size: int, *, fused_loss: bool = False) -> ModelSize | nn.Module:
    """A `ModelSize` computed from the config, or the model built on the meta device (plugins)."""
    from craft.config import registry

    vocab = getattr(model_cfg, "vocab_size", None) or vocab_size
    counts = param_counts(model_cfg, vocab)
    if counts is not None:
        return ModelSize(model_cfg, vocab, counts)
    return meta_model(registry.build, "model", model_cfg, vocab, fused_loss=fused_loss)


def _config(model: ModelSize | nn.Module) -> Any:
    if isinstance(model, ModelSize):
        return model.config
    return model.config if isinstance(model, (GPT, RNNLM)) else None


def count_params(model: ModelSize | nn.Module) -> ParamCounts:
    """Split the parameters of `model` into embedding tables and the rest."""
    if isinstance(model, ModelSize):
        return model.counts
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in params.values())
    tables = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Embedding)}
    embedding = sum(p.numel() for p in tables.values())
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    tied = sum(p.numel() for i, p in tables.items() if i in linear_weights)
    return ParamCounts(total, embedding, total - embedding, total - embedding + tied)


def attention_flops_per_token(model: ModelSize | nn.Module, seq_len: int) -> int:
    """12 * L * H * hs * T for a GPT (forward + backward of q.k and att.v); 0 for an RNN."""
    cfg = _config(model)
    if getattr(cfg, "type", None) != "gpt":
        return 0
    return 12 * cfg.n_layer * cfg.n_head * (cfg.d_model // cfg.n_head) * seq_len


def flops_per_token(model: ModelSize | nn.Module, seq_len: int) -> int:
    """Training FLOPs per token: 6N + 12 * L * H * hs * T (see the module docstring)."""
    return 6 * count_params(model).matmul + attention_flops_per_token(model, seq_len)


def _activation_elements_per_token(model: ModelSize | nn.Module, fused_loss: bool) -> float:
    """Elements autograd keeps per token for the backward pass (an estimate, see below).

    GPT block: the norm inputs and outputs (4C), q, k, v (C + 2 * C_kv), the attention output
    (C), and the feed-forward's hidden activations (2 * hidden for GELU, 4 * hidden for SwiGLU);
    attention is assumed to keep no T x T scores (fused SDPA kernels). RNN layer: input, gates
    and states. Output: logits and their softmax (2V), or nothing when the loss is fused.
    """
    out = 0.0 if fused_loss else 2.0 * model.vocab_size
    cfg = _config(model)
    kind = getattr(cfg, "type", None)
    if kind == "gpt":
        c, c_kv = cfg.d_model, (cfg.n_kv_head or cfg.n_head) * (cfg.d_model // cfg.n_head)
        hidden = mlp_hidden_size(cfg)
        per_layer = 4 * c + (c + 2 * c_kv) + c + (4 if cfg.mlp == "swiglu" else 2) * hidden
        return cfg.n_layer * per_layer + 3 * c + out  # + embedding sum, final norm in/out
    if kind == "rnn":
        gates = {"rnn": 1, "gru": 3, "lstm": 4}[cfg.cell]
        states = 2 if cfg.cell == "lstm" else 1
        per_layer = (gates + states + 1) * cfg.hidden_size
        return cfg.d_embed + cfg.n_layer * per_layer + out
    raise TypeError(f"no activation estimate for {type(model).__name__}")


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # bytes of float32 weights
    gradients: int  # bytes of float32 gradients
    optimizer: int  # bytes of optimizer state
    activations: int  # bytes kept for backward at this batch size and precision

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


def estimate_memory(
    model: ModelSize | nn.Module,
    batch_size: int,
    seq_len: int,
    precision: str = "no",
    optimizer: str = "adamw",
    momentum: float = 0.0,
    fused_loss: bool = False,
) -> MemoryEstimate:
    """Training memory of one process: fp32 weights and grads, optimizer state, activations.

    Mixed precision keeps float32 master weights; only activations shrink to 2 bytes. AdamW keeps
    two float32 moments per parameter, SGD one momentum buffer when momentum > 0.
    """
    n = count_params(model).total
    states = {"adamw": 2, "sgd": 1 if momentum > 0 else 0}.get(optimizer, 2)
    per_token = _activation_elements_per_token(model, fused_loss)
    act_bytes = PRECISION_BYTES.get(precision, 4)
    # the loss always runs in float32: logits/softmax are counted at 4 bytes
    out = 0.0 if fused_loss else 2.0 * model.vocab_size
    activations = batch_size * seq_len * ((per_token - out) * act_bytes + out * 4)
    return MemoryEstimate(4 * n, 4 * n, 4 * n * states, int(activations))


def meta_model(build: object, *args: object, **kwargs: object) -> nn.Module:
    """Call a model builder on the meta device: exact shapes, no memory, no initialisation cost."""
    with torch.device("meta"):
        return build(*args, **kwargs)  # type: ignore[operator]
