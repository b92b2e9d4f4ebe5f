"""Character tokenizer: one id per Unicode character, vocabulary learned from the data.

The vocabulary is the sorted set of characters seen (stable across runs and machines). With
`unk=True` an extra `<unk>` id (the last one) absorbs unseen characters and decodes to U+FFFD;
otherwise encoding an unseen character is a TokenizerError that lists the characters.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from craft.data.tokenizers.base import REPLACEMENT_CHAR, Tokenizer
from craft.errors import TokenizerError

UNK_TOKEN = "<unk>"
_MAX_LISTED = 20


def _codepoints(text: str) -> np.ndarray:
    """(N,) uint32 code points of `text`, without a Python-level loop."""
    try:
        return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    except UnicodeEncodeError as e:
        raise TokenizerError(
            f"char tokenizer: text holds a lone surrogate {text[e.start]!r} at index {e.start}"
        ) from None


class CharTokenizer(Tokenizer):
    type = "char"
    parallel_encode = False  # a numpy table lookup: faster in-process than through a pool

    def __init__(self, chars: Sequence[str], unk: bool = False) -> None:
        chars = list(chars)
        if not chars:
            raise TokenizerError("char tokenizer: the vocabulary is empty (no text to learn from)")
        if any(not isinstance(c, str) or len(c) != 1 for c in chars) or len(set(chars)) != len(
            chars
        ):
            raise TokenizerError("char tokenizer: vocabulary must be distinct single characters")
        self.chars = chars
        self.unk = unk
        self.unk_id = len(chars) if unk else None
        cps = _codepoints("".join(chars)).astype(np.int64)
        self._lut = np.full(int(cps.max()) + 1, -1, dtype=np.int64)  # code point -> id
        self._lut[cps] = np.arange(len(chars), dtype=np.int64)
        self._itos = [*chars, REPLACEMENT_CHAR] if unk else chars

    @classmethod
    def from_texts(cls, texts: Iterable[str], unk: bool = False) -> CharTokenizer:
        """Learn the vocabulary (sorted distinct characters) from an iterable of text chunks."""
        seen: set[str] = set()
        for chunk in texts:
            seen.update(chunk)
        return cls(sorted(seen), unk=unk)

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    def encode_array(self, text: str) -> np.ndarray:
        cps = _codepoints(text)
        if cps.size == 0:
            return np.zeros(0, dtype=np.int64)
        if int(cps.max()) < self._lut.size:
            ids = self._lut[cps]
        else:
            ids = np.full(cps.size, -1, dtype=np.int64)
            known = cps < self._lut.size
            ids[known] = self._lut[cps[known]]
        missing = ids < 0
        if missing.any():
            if self.unk_id is not None:
                ids[missing] = self.unk_id
            else:
                self._raise_unknown(cps[missing])
        return ids

    def _raise_unknown(self, cps: np.ndarray) -> None:
        unknown = [chr(int(c)) for c in np.unique(cps)]
        listed = ", ".join(repr(c) for c in unknown[:_MAX_LISTED])
        more = f" and {len(unknown) - _MAX_LISTED} more" if len(unknown) > _MAX_LISTED else ""
        raise TokenizerError(
            f"char tokenizer: {len(unknown)} character(s) not in the vocabulary of "
            f"{len(self.chars)}: {listed}{more}; set tokenizer.unk = true to map them to {UNK_TOKEN}"
        )

    def _decode(self, ids: list[int]) -> str:
        return "".join([self._itos[i] for i in ids])

    def artifact(self) -> dict[str, Any]:
        return {"chars": self.chars, "unk": self.unk}

    def config(self) -> dict[str, Any]:
        return {"type": self.type, "unk": self.unk}

    @classmethod
    def from_artifact(cls, data: dict[str, Any], directory: Path) -> CharTokenizer:
        chars, unk = data.get("chars"), data.get("unk", False)
        if not isinstance(chars, list) or not isinstance(unk, bool):
            raise TokenizerError(
                f"{directory / 'tokenizer.json'}: a char tokenizer needs 'chars' (a list of "
                "characters) and 'unk' (true/false)"
            )
        try:
            return cls(chars, unk=unk)
        except TokenizerError as e:
            raise TokenizerError(f"{directory / 'tokenizer.json'}: {e.message}") from None


def build(
    cfg: Any, texts: Iterable[str] | None = None, workdir: Path | None = None
) -> CharTokenizer:
    """Registry builder: learn the vocabulary from `texts` (`workdir` is unused)."""
    if texts is None:
        raise TokenizerError(
            "char tokenizer: learns its vocabulary from the data, but no text was given"
        )
    return CharTokenizer.from_texts(texts, unk=bool(getattr(cfg, "unk", False)))
