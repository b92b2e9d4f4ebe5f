"""Hugging Face tokenizer: a `tokenizer.json` run by the `tokenizers` library (no code is loaded).

Opens an HF tokenizer directory (`tokenizer.json`, plus `tokenizer_config.json`,
`special_tokens_map.json` and `chat_template.jinja` when present) or a Hub id, e.g. GPT-2's
byte-level BPE or a Llama-style SentencePiece BPE. Special tokens (bos, eos, unk, pad) and the chat
template come from the config files. Saved by Craft as `tokenizer.json` (Craft's artifact: the
special tokens, chat template and the sha256 of the HF file) next to `hf_tokenizer.json` (the HF
file, unchanged); `save_hf(dir)` writes the files `transformers.AutoTokenizer` loads.

Encoding for datasets adds no special tokens; `prompt_ids` applies the tokenizer's own
post-processor (e.g. Llama's leading `<s>`), as `transformers` does for a generation prompt.
Decoding skips special tokens, like the `text-generation` pipeline.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from craft.data.tokenizers.base import Tokenizer
from craft.errors import CheckpointError, TokenizerError
from craft.fileio import atomic_write_bytes
from craft.hub import ModelFiles

HF_FILE = "hf_tokenizer.json"  # the HF tokenizer.json inside a Craft-saved tokenizer directory
HF_TOKENIZER = "tokenizer.json"
HF_CONFIG = "tokenizer_config.json"
HF_SPECIAL = "special_tokens_map.json"
HF_CHAT_TEMPLATE = "chat_template.jinja"
SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token")
# What transformers' `clean_up_tokenization_spaces` removes (when a tokenizer_config asks for it).
_CLEANUP = [
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
]


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read the {what} ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: the {what} is not a JSON object")
    return data


def is_hf_tokenizer_json(data: Any) -> bool:
    """Whether a parsed tokenizer.json is in the `tokenizers` format (not Craft's own artifact)."""
    return isinstance(data, dict) and isinstance(data.get("model"), dict) and "type" not in data


class HFTokenizer(Tokenizer):
    type = "hf"
    splits_characters = True  # byte-level and byte-fallback pieces may split a character

    def __init__(
        self,
        tokenizer_json: str,
        *,
        specials: dict[str, str | None] | None = None,
        chat_template: str | None = None,
        clean_up_spaces: bool = False,
        split_special_tokens: bool = False,
        origin: str = "<memory>",
    ) -> None:
        from tokenizers import Tokenizer as _Backend

        try:
            self._tok = _Backend.from_str(tokenizer_json)
        except Exception as e:  # tokenizers raises plain Exception with serde's text
            raise TokenizerError(
                f"{origin}: not a valid Hugging Face tokenizer.json ({e})"
            ) from None
        self.json_text = tokenizer_json
        self.origin = origin
        self.specials = {k: (specials or {}).get(k) for k in SPECIALS}
        self.chat_template = chat_template
        self.clean_up_spaces = clean_up_spaces
        # True: special tokens written in the text are encoded as plain text (never as their id).
        self.split_special_tokens = split_special_tokens
        self._tok.encode_special_tokens = split_special_tokens
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._size = max(vocab.values(), default=-1) + 1
        if self._size <= 0:
            raise TokenizerError(f"{origin}: the tokenizer has an empty vocabulary")
        self.bos_id = self._special_id("bos_token")
        self.eos_id = self._special_id("eos_token")
        self.unk_id = self._special_id("unk_token")
        self.pad_id = self._special_id("pad_token")

    def _special_id(self, key: str) -> int | None:
        text = self.specials.get(key)
        if text is None:
            return None
        i = self._tok.token_to_id(text)
        if i is None:
            raise TokenizerError(
                f"{self.origin}: {key} {text!r} is not in the tokenizer's vocabulary"
            )
        return int(i)

    # ------------------------------------------------------------------ interface

    @property
    def vocab_size(self) -> int:
        return self._size

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.json_text.encode("utf-8")).hexdigest()

    def encode_array(self, text: str) -> np.ndarray:
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        except Exception as e:  # e.g. a WordLevel vocabulary without an unknown token
            raise TokenizerError(f"hf tokenizer: cannot encode the text ({e})") from None
        return np.asarray(ids, dtype=np.int64)

    def prompt_ids(self, text: str) -> list[int]:
        """Ids of a generation prompt, with the special tokens the tokenizer adds (e.g. bos)."""
        try:
            return list(self._tok.encode(text, add_special_tokens=True).ids)
        except Exception as e:
            raise TokenizerError(f"hf tokenizer: cannot encode the prompt ({e})") from None

    def _decode(self, ids: list[int]) -> str:
        text = self._tok.decode(ids, skip_special_tokens=True)
        if self.clean_up_spaces:
            for a, b in _CLEANUP:
                text = text.replace(a, b)
        return text

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def artifact(self) -> dict[str, Any]:
        return {
            "hf_file": HF_FILE,
            "sha256": self.sha256,
            "specials": self.specials,
            "chat_template": self.chat_template,
            "clean_up_tokenization_spaces": self.clean_up_spaces,
            "split_special_tokens": self.split_special_tokens,
        }

    def config(self) -> dict[str, Any]:
        return {"type": self.type, "sha256": self.sha256, "vocab_size": self.vocab_size}

    def extra_files(self) -> dict[str, bytes]:
        return {HF_FILE: self.json_text.encode("utf-8")}

    def to_hf(self) -> HFTokenizer:
        return self

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_artifact(cls, data: dict[str, Any], directory: Path) -> HFTokenizer:
        """A tokenizer that Craft saved (`Tokenizer.save`)."""
        name = data.get("hf_file", HF_FILE)
        if name != HF_FILE:
            raise TokenizerError(f"{directory / 'tokenizer.json'}: unexpected hf_file {name!r}")
        path = directory / HF_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{path}: cannot read the HF tokenizer file ({e})") from None
        tok = cls(
            text,
            specials=data.get("specials") or {},
            chat_template=data.get("chat_template"),
            clean_up_spaces=bool(data.get("clean_up_tokenization_spaces", False)),
            split_special_tokens=bool(data.get("split_special_tokens", False)),
            origin=str(path),
        )
        if data.get("sha256") not in (None, tok.sha256):
            raise TokenizerError(
                f"{path}: sha256 does not match tokenizer.json; the tokenizer file was changed"
            )
        return tok

    @classmethod
    def from_hf_dir(cls, source: str | Path | ModelFiles) -> HFTokenizer:
        """An HF tokenizer directory or Hub id (tokenizer.json + optional config files)."""
        from craft.hub import model_files

        try:
            files = source if isinstance(source, ModelFiles) else model_files(source)
            tok_path = files.file(HF_TOKENIZER)
            if not tok_path.is_file():
                raise TokenizerError(
                    f"{files.dir}: no {HF_TOKENIZER} (a Hugging Face tokenizer in the `tokenizers` "
                    "format is needed; slow-tokenizer files such as vocab.json/merges.txt or "
                    "tokenizer.model alone are not read)"
                )
            cfg_path, map_path = files.file(HF_CONFIG), files.file(HF_SPECIAL)
            chat_path = files.file(HF_CHAT_TEMPLATE)
        except CheckpointError as e:
            raise TokenizerError(e.message) from None
        config = _read_json(cfg_path, "tokenizer config") if cfg_path.is_file() else {}
        mapping = _read_json(map_path, "special tokens map") if map_path.is_file() else {}
        specials = {k: _token_text(config.get(k)) or _token_text(mapping.get(k)) for k in SPECIALS}
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is None and chat_path.is_file():
            template = chat_path.read_text(encoding="utf-8")
        try:
            text = tok_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{tok_path}: cannot read ({e})") from None
        return cls(
            text,
            specials=specials,
            chat_template=template if isinstance(template, str) else None,
            clean_up_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            split_special_tokens=bool(config.get("split_special_tokens", False)),
            origin=str(tok_path),
        )

    # ------------------------------------------------------------------ HF files

    def hf_files(self, model_max_length: int | None = None) -> dict[str, bytes]:
        """The files `transformers.AutoTokenizer.from_pretrained` reads (no custom code)."""
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": self.clean_up_spaces,
            "split_special_tokens": self.split_special_tokens,
            **{k: v for k, v in self.specials.items() if v is not None},
        }
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        special_map = {k: v for k, v in self.specials.items() if v is not None}

        def dump(obj: Any) -> bytes:
            return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

        return {
            HF_TOKENIZER: self.json_text.encode("utf-8"),
            HF_CONFIG: dump(config),
            HF_SPECIAL: dump(special_map),
        }

    def save_hf(self, directory: str | Path, model_max_length: int | None = None) -> list[str]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = self.hf_files(model_max_length)
        for name, data in files.items():
            atomic_write_bytes(directory / name, data)
        return list(files)


def build(cfg: Any, texts: Iterable[str] | None = None, workdir: Path | None = None) -> HFTokenizer:
    """Registry builder: open `cfg.path` (an HF tokenizer directory, a Craft-saved one, or a Hub
    id); nothing is learned from `texts`."""
    from craft.data.tokenizers import load_tokenizer

    path = Path(cfg.path).expanduser()
    tok = load_tokenizer(path) if path.is_dir() else HFTokenizer.from_hf_dir(cfg.path)
    if not isinstance(tok, HFTokenizer):
        raise TokenizerError(f"tokenizer.path = {cfg.path!r}: holds a {tok.type} tokenizer")
    return tok
