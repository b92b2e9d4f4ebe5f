"""Config classes of the built-in components, registered with their builders by import path.

Adding a built-in component: its implementation file (which holds the builder) plus an entry here.
A plugin does both in its own file with `craft.config.registry.register_*` decorators.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from craft.config.registry import register
from craft.config.sections import Section

# --------------------------------------------------------------------------------------- models


class GPTConfig(Section):
    type: Literal["gpt"] = "gpt"
    n_layer: int = Field(6, ge=1, description="Transformer blocks.")
    n_head: int = Field(6, ge=1, description="Query heads per attention layer.")
    n_kv_head: int | None = Field(
        None, ge=1, description="Key/value heads (grouped-query attention); defaults to n_head."
    )
    d_model: int = Field(384, ge=1, description="Residual stream width; must divide by n_head.")
    block_size: int = Field(256, ge=1, description="Context length in tokens.")
    vocab_size: int | None = Field(
        None, ge=1, description="Vocabulary size; taken from the tokenizer when not set."
    )
    norm: Literal["layernorm", "rmsnorm"] = Field("layernorm", description="Normalisation layer.")
    norm_eps: float = Field(1e-5, gt=0, description="Epsilon of the normalisation layers.")
    positions: Literal["learned", "rope"] = Field(
        "learned", description="Learned absolute position embeddings or rotary embeddings."
    )
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency.")
    mlp: Literal["gelu", "gelu_tanh", "swiglu"] = Field(
        "gelu",
        description="Feed-forward block: GELU (exact erf), GELU with the tanh approximation (GPT-2's gelu_new) or SwiGLU.",
    )
    mlp_hidden: int | None = Field(
        None,
        ge=1,
        description="Feed-forward hidden size; default 4*d_model (gelu, gelu_tanh) or 8/3*d_model rounded up to a multiple of 64 (swiglu).",
    )
    bias: bool = Field(True, description="Biases in linear and norm layers.")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout on the embeddings and residual branches."
    )
    attn_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout on the attention probabilities while training (nanoGPT uses `dropout` for both).",
    )
    tie_embeddings: bool = Field(
        True, description="Share the token embedding with the output layer."
    )
    init_std: float = Field(0.02, gt=0, description="Std of the normal weight initialisation.")
    init_from: str | None = Field(
        None,
        description="Start from these weights: a Craft run, checkpoint or export directory, a Hugging Face model directory or a Hub id (e.g. gpt2). The other model keys are taken from it; a recipe may only change those that keep every weight's shape (dropout, a shorter block_size, ...).",
    )

    @model_validator(mode="after")
    def _check_heads(self) -> GPTConfig:
        if self.d_model % self.n_head:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})"
            )
        kv = self.n_kv_head or self.n_head
        if self.n_head % kv:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({kv})")
        if self.positions == "rope" and (self.d_model // self.n_head) % 2:
            raise ValueError("rope needs an even head size (d_model / n_head)")
        return self


class RNNConfig(Section):
    type: Literal["rnn"] = "rnn"
    cell: Literal["rnn", "lstm", "gru"] = Field("lstm", description="Recurrent cell.")
    n_layer: int = Field(2, ge=1, description="Stacked recurrent layers.")
    d_embed: int = Field(128, ge=1, description="Token embedding width.")
    hidden_size: int = Field(256, ge=1, description="Hidden state width.")
    block_size: int = Field(
        128, ge=1, description="Training sequence length (truncated BPTT window)."
    )
    vocab_size: int | None = Field(
        None, ge=1, description="Vocabulary size; taken from the tokenizer when not set."
    )
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout between layers and on the output."
    )
    tie_embeddings: bool = Field(
        False,
        description="Share the embedding with the output layer (needs d_embed == hidden_size or a projection).",
    )


register("model", "gpt", config=GPTConfig, builder="craft.models.gpt:build")
register("model", "rnn", config=RNNConfig, builder="craft.models.rnn:build")

# ----------------------------------------------------------------------------------- tokenizers


class CharTokenizerConfig(Section):
    type: Literal["char"] = "char"
    unk: bool = Field(
        False, description="Map characters missing from the vocabulary to <unk> instead of failing."
    )


class BytesTokenizerConfig(Section):
    type: Literal["bytes"] = "bytes"


class SentencePieceTokenizerConfig(Section):
    type: Literal["sentencepiece"] = "sentencepiece"
    model: str | None = Field(
        None, description="Path to a trained .model file; when unset one is trained on the data."
    )
    vocab_size: int = Field(
        2000, ge=16, le=1 << 24, description="Vocabulary size when training a model."
    )
    model_type: Literal["bpe", "unigram"] = Field("bpe", description="SentencePiece algorithm.")
    byte_fallback: bool = Field(True, description="Encode unknown characters as UTF-8 bytes.")
    character_coverage: float = Field(
        1.0, gt=0.0, le=1.0, description="Fraction of characters covered by the vocabulary."
    )


class HFTokenizerConfig(Section):
    type: Literal["hf"] = "hf"
    path: str = Field(
        description="A Hugging Face tokenizer directory (tokenizer.json), a tokenizer saved by Craft, or a Hub id."
    )

    def fingerprint(self) -> dict[str, str]:
        """What fixes the ids (recorded with prepared data): a local tokenizer file's sha256,
        else the Hub id."""
        import hashlib
        from pathlib import Path

        root = Path(self.path).expanduser()
        for name in ("hf_tokenizer.json", "tokenizer.json"):
            if (root / name).is_file() and not (root / name).is_symlink():
                digest = hashlib.sha256((root / name).read_bytes()).hexdigest()
                return {"type": self.type, "tokenizer_sha256": digest}
        return {"type": self.type, "path": self.path}


register(
    "tokenizer", "char", config=CharTokenizerConfig, builder="craft.data.tokenizers.char:build"
)
register(
    "tokenizer", "bytes", config=BytesTokenizerConfig, builder="craft.data.tokenizers.bytes:build"
)
register(
    "tokenizer",
    "sentencepiece",
    config=SentencePieceTokenizerConfig,
    builder="craft.data.tokenizers.sentencepiece:build",
)
register("tokenizer", "hf", config=HFTokenizerConfig, builder="craft.data.tokenizers.hf:build")

# ------------------------------------------------------------------------------------- datasets


class TokensDataConfig(Section):
    type: Literal["tokens"] = "tokens"
    source: str | None = Field(
        None, description="Named source (e.g. tinyshakespeare) prepared automatically on first use."
    )
    files: list[str] = Field(
        default_factory=list,
        description="Text, JSON Lines (.jsonl, .jsonl.gz, .json.gz) or Parquet files, directories or globs to prepare (instead of a source).",
    )
    dir: str | None = Field(
        None,
        description="Prepared dataset directory; default <CRAFT_HOME>/datasets/<source>-<tokenizer>.",
    )
    val_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="Tail of the token stream kept for validation."
    )
    errors: Literal["strict", "replace", "skip"] = Field(
        "strict",
        description="Bad input: fail naming file and offset or record (strict), replace non-UTF-8 bytes with U+FFFD (replace), or skip bad JSON Lines/Parquet records and count them (skip).",
    )
    text_field: str = Field(
        "text",
        min_length=1,
        description="JSON Lines / Parquet inputs: the field holding each record's text.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> TokensDataConfig:
        if self.source and self.files:
            raise ValueError("set either data.source or data.files, not both")
        return self


class RandomDataConfig(Section):
    type: Literal["random"] = "random"
    vocab_size: int = Field(256, ge=2, description="Uniform random tokens in [0, vocab_size).")
    seed: int = Field(0, ge=0, description="Seed of the token stream.")


register("data", "tokens", config=TokensDataConfig, builder="craft.data.datasets:build_tokens")
register("data", "random", config=RandomDataConfig, builder="craft.data.datasets:build_random")

# ----------------------------------------------------------------------------------- optimizers


class AdamWConfig(Section):
    type: Literal["adamw"] = "adamw"
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    betas: tuple[float, float] = Field(
        (0.9, 0.95), strict=False, description="Adam beta1, beta2 (each in [0, 1))."
    )
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    weight_decay: float = Field(
        0.1, ge=0, description="Decoupled weight decay, applied to matrices only."
    )
    fused: bool | None = Field(None, description="Fused CUDA implementation; default: on CUDA.")

    @field_validator("betas")
    @classmethod
    def _betas_below_one(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"each beta must be in [0, 1), got {list(betas)}")
        return betas


class SGDConfig(Section):
    type: Literal["sgd"] = "sgd"
    lr: float = Field(1e-2, gt=0, description="Peak learning rate.")
    momentum: float = Field(0.9, ge=0, description="Momentum.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay, applied to matrices only.")


register("optimizer", "adamw", config=AdamWConfig, builder="craft.training.optim:build_adamw")
register("optimizer", "sgd", config=SGDConfig, builder="craft.training.optim:build_sgd")

# ----------------------------------------------------------------------------------- schedulers


class CosineSchedulerConfig(Section):
    type: Literal["cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 to the peak lr.")
    min_lr: float = Field(0.0, ge=0, description="Floor reached at training.max_steps.")


class LinearSchedulerConfig(Section):
    type: Literal["linear"] = "linear"
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 to the peak lr.")
    min_lr: float = Field(0.0, ge=0, description="Value reached at training.max_steps.")


class ConstantSchedulerConfig(Section):
    type: Literal["constant"] = "constant"
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 to the peak lr.")


class WSDSchedulerConfig(Section):
    type: Literal["wsd"] = "wsd"
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 to the peak lr.")
    decay_fraction: float = Field(
        0.2, gt=0, le=1, description="Final fraction of training spent decaying to min_lr."
    )
    min_lr: float = Field(0.0, ge=0, description="Value reached at training.max_steps.")


for _name, _cls in [
    ("cosine", CosineSchedulerConfig),
    ("linear", LinearSchedulerConfig),
    ("constant", ConstantSchedulerConfig),
    ("wsd", WSDSchedulerConfig),
]:
    register("scheduler", _name, config=_cls, builder=f"craft.training.schedulers:build_{_name}")

# ------------------------------------------------------------------------------------ callbacks

# Built-in callbacks (craft/training/callbacks.py fixes the order they run in); a recipe's
# `training.callbacks` may name these or a plugin's. `sample` drives generation, so it lives there.
for _name, _builder in [
    ("progress", "craft.training.builtin_callbacks:build_progress"),
    ("metrics_jsonl", "craft.training.builtin_callbacks:build_metrics_file"),
    ("trackers", "craft.training.builtin_callbacks:build_trackers"),
    ("sample", "craft.sample_callback:build_sample"),
    ("early_stopping", "craft.training.builtin_callbacks:build_early_stopping"),
    ("loss_curve", "craft.training.builtin_callbacks:build_loss_curve"),
]:
    register("callback", _name, builder=_builder)

# The default `type` of each discriminated section when a recipe does not name one.
DEFAULT_TYPES = {
    "model": "gpt",
    "data": "tokens",
    "tokenizer": "char",
    "optimizer": "adamw",
    "scheduler": "cosine",
}
