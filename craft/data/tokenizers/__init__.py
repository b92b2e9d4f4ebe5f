"""Tokenizers: `char`, `bytes` and `sentencepiece`, one interface (see `base.Tokenizer`).

`load_tokenizer(path)` opens a saved tokenizer directory (or a SentencePiece `.model` file).
"""

from __future__ import annotations

from pathlib import Path

from craft.data.tokenizers.base import (
    TOKENIZER_FILE,
    IncrementalDecoder,
    Tokenizer,
    read_artifact,
)
from craft.data.tokenizers.bytes import BytesTokenizer
from craft.data.tokenizers.char import CharTokenizer
from craft.data.tokenizers.sentencepiece import SentencePieceTokenizer
from craft.errors import TokenizerError

_LOADERS = {
    "char": CharTokenizer.from_artifact,
    "bytes": BytesTokenizer.from_artifact,
    "sentencepiece": SentencePieceTokenizer.from_artifact,
}


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
    "IncrementalDecoder",
    "SentencePieceTokenizer",
    "Tokenizer",
    "load_tokenizer",
]
