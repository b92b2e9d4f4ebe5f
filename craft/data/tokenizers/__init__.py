"""Tokenizers: `char`, `bytes`, `sentencepiece` and `hf`, one interface (see `base.Tokenizer`).

`load_tokenizer(path)` opens a saved tokenizer directory, a Hugging Face tokenizer directory
(`tokenizer.json` in the `tokenizers` format) or a SentencePiece `.model` file.
"""

from __future__ import annotations

import json
from pathlib import Path

from craft.data.tokenizers.base import (
    TOKENIZER_FILE,
    IncrementalDecoder,
    Tokenizer,
    read_artifact,
)
from craft.data.tokenizers.bytes import BytesTokenizer
from craft.data.tokenizers.char import CharTokenizer
from craft.data.tokenizers.hf import HFTokenizer, is_hf_tokenizer_json
from craft.data.tokenizers.sentencepiece import SentencePieceTokenizer
from craft.errors import TokenizerError

_LOADERS = {
    "char": CharTokenizer.from_artifact,
    "bytes": BytesTokenizer.from_artifact,
    "sentencepiece": SentencePieceTokenizer.from_artifact,
    "hf": HFTokenizer.from_artifact,
}


def _is_hf_dir(path: Path) -> bool:
    try:
        with open(path / TOKENIZER_FILE, encoding="utf-8") as f:
            return is_hf_tokenizer_json(json.load(f))
    except (OSError, ValueError):
        return False


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer saved with `Tokenizer.save(dir)`, or a SentencePiece `.model` file."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".model":
        return SentencePieceTokenizer.from_file(path)
    if not path.exists():
        raise TokenizerError(f"{path}: tokenizer not found")
    if not path.is_dir():
        raise TokenizerError(
            f"{path}: expected a tokenizer directory (with {TOKENIZER_FILE}) or a .model file"
        )
    if _is_hf_dir(path):
        return HFTokenizer.from_hf_dir(path)
    data = read_artifact(path)
    loader = _LOADERS.get(data["type"])
    if loader is None:
        raise TokenizerError(
            f"{path / TOKENIZER_FILE}: unknown tokenizer type {data['type']!r}; "
            f"expected one of {', '.join(sorted(_LOADERS))}"
        )
    return loader(data, path)


__all__ = [
    "TOKENIZER_FILE",
    "BytesTokenizer",
    "CharTokenizer",
    "HFTokenizer",
    "IncrementalDecoder",
    "SentencePieceTokenizer",
    "Tokenizer",
    "load_tokenizer",
]
