"""Parameter counts, training FLOPs per token and memory estimates of a built model.

Build the model on the meta device (`with torch.device("meta"): ...`) to get these numbers for
any size without allocating its weights.

FLOPs per token of training follow the formula nanoGPT and torchtitan use for MFU (Kaplan et al.
2020, appendix; PaLM appendix B): 6N + 12 * L * H * hs * T, where N counts the parameters that
take part in a matmul (so the token embedding only when it is tied to the output layer, and never
the position embedding) and the second term is attention's q.k and attention.v products
(forward 4 * L * H * hs * T, backward twice that), without discounting the causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def count_params(model: nn.Module) -> ParamCounts:
    """Split the parameters of `model` into embedding tables and the rest."""
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in params.values())
    tables = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Embedding)}
    embedding = sum(p.numel() for p in tables.values())
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    tied = sum(p.numel() for i, p in tables.items() if i in linear_weights)
    return ParamCounts(total, embedding, total - embedding, total - embedding + tied)


def attention_flops_per_token(model: nn.Module, seq_len: int) -> int:
    """12 * L * H * hs * T for a GPT (forward + backward of q.k and att.v); 0 for an RNN."""
    if not isinstance(model, GPT):
        return 0
    cfg = model.config
    return 12 * cfg.n_layer * cfg.n_head * (cfg.d_model // cfg.n_head) * seq_len


def flops_per_token(model: nn.Module, seq_len: int) -> int:
    """Training FLOPs per token: 6N + 12 * L * H * hs * T (see the module docstring)."""
    return 6 * count_params(model).matmul + attention_flops_per_token(model, seq_len)


def _activation_elements_per_token(model: nn.Module, fused_loss: bool) -> float:
    """Elements autograd keeps per token for the backward pass (an estimate, see below).

    GPT block: the norm inputs and outputs (4C), q, k, v (C + 2 * C_kv), the attention output
    (C), and the feed-forward's hidden activations (2 * hidden for GELU, 4 * hidden for SwiGLU);
    attention is assumed to keep no T x T scores (fused SDPA kernels). RNN layer: input, gates
    and states. Output: logits and their softmax (2V), or nothing when the loss is fused.
    """
    out = 0.0 if fused_loss else 2.0 * model.vocab_size
    if isinstance(model, GPT):
        cfg = model.config
        c, c_kv = cfg.d_model, model.n_kv_head * model.head_size
        hidden = mlp_hidden_size(cfg)
        per_layer = 4 * c + (c + 2 * c_kv) + c + (4 if cfg.mlp == "swiglu" else 2) * hidden
        return cfg.n_layer * per_layer + 3 * c + out  # + embedding sum, final norm in/out
    if isinstance(model, RNNLM):
        cfg = model.config
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
    model: nn.Module,
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
