"""Byte tokenizer: the UTF-8 bytes of the text (ids 0-255) plus `<bos>` (256) and `<eos>` (257).

Needs no training and encodes any text; decoding skips the special ids and replaces invalid byte
sequences with U+FFFD.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from craft.data.tokenizers.base import Tokenizer
from craft.errors import TokenizerError

NUM_BYTES = 256


class BytesTokenizer(Tokenizer):
    type = "bytes"
    splits_characters = True
    parallel_encode = False  # UTF-8 encoding runs at disk speed: a pool only adds copying
    bos_id = NUM_BYTES
    eos_id = NUM_BYTES + 1

    @property
    def vocab_size(self) -> int:
        return NUM_BYTES + 2

    def encode_array(self, text: str) -> np.ndarray:
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TokenizerError(
                f"bytes tokenizer: text holds a lone surrogate {text[e.start]!r} at index {e.start}"
            ) from None
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def _decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < NUM_BYTES).decode("utf-8", errors="replace")

    def artifact(self) -> dict[str, Any]:
        return {"bos_id": self.bos_id, "eos_id": self.eos_id}

    def config(self) -> dict[str, Any]:
        return {"type": self.type}

    @classmethod
    def from_artifact(cls, data: dict[str, Any], directory: Path) -> BytesTokenizer:
        return cls()


def build(
    cfg: Any, texts: Iterable[str] | None = None, workdir: Path | None = None
) -> BytesTokenizer:
    """Registry builder: nothing to learn, `texts` and `workdir` are ignored."""
    return BytesTokenizer()
