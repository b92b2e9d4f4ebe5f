"""Tiny Hugging Face models and tokenizers built offline (random weights, tokenizers trained on
tinyshakespeare): the inputs of the interop tests and of the import benchmark."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

SPECIAL = "<|endoftext|>"


def train_bpe(text: str, vocab_size: int = 300, kind: str = "gpt2") -> Any:
    """A byte-level BPE (GPT-2 style) or a Llama-style (Metaspace, byte fallback, <s> bos)
    `tokenizers.Tokenizer` trained on `text`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if kind == "gpt2":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[SPECIAL],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator([text], trainer)
        return tok
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)]],
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


def save_tokenizer(
    tok: Any, out: Path, kind: str = "gpt2", chat_template: str | None = None
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    if kind == "gpt2":
        config = {"bos_token": SPECIAL, "eos_token": SPECIAL, "unk_token": SPECIAL}
    else:
        config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config |= {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def gpt2_model(vocab_size: int, seed: int = 0, **kw: Any) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    args = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    cfg = GPT2Config(vocab_size=vocab_size, **{**args, **kw})
    return GPT2LMHeadModel(cfg).eval()


def llama_model(vocab_size: int, seed: int = 0, arch: str = "llama", **kw: Any) -> Any:
    import transformers

    torch.manual_seed(seed)
    args = dict(
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_theta=500.0,
        bos_token_id=1,
        eos_token_id=2,
    )
    name = {"llama": "Llama", "mistral": "Mistral"}[arch]
    cfg = getattr(transformers, f"{name}Config")(vocab_size=vocab_size, **{**args, **kw})
    return getattr(transformers, f"{name}ForCausalLM")(cfg).eval()


def save_model(model: Any, out: Path, tok: Any = None, kind: str = "gpt2", **kw: Any) -> Path:
    model.save_pretrained(str(out), safe_serialization=True, **kw)
    if tok is not None:
        save_tokenizer(tok, out, kind)
    return out
