"""The tokenizer interface shared by every tokenizer, plus incremental (streaming) decoding.

A tokenizer is saved as a directory: `tokenizer.json` (type, format version, and the vocabulary or
the name and sha256 of its model file) next to any binary artifact such as `tokenizer.model`.
Nothing is pickled. `tokenizer.json` is written last, so a directory holding it is complete.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from craft.errors import TokenizerError
from craft.fileio import atomic_write_bytes, atomic_write_json
from craft.safety import inside, read_json_bounded

TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1
REPLACEMENT_CHAR = "\ufffd"


def as_id_list(ids: Any) -> list[int]:
    """Accept a list/tuple of ints, a numpy array or a torch tensor (anything with `.tolist()`)."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


class Tokenizer(ABC):
    """Maps text to integer ids and back. Subclasses set `type` and implement the abstract parts."""

    type: ClassVar[str]
    # True when one character may span several ids (byte pieces): streaming decode must then hold
    # back ids until a character is complete.
    splits_characters: ClassVar[bool] = False
    # Whether preparation spreads encoding over worker processes by default. False when encoding
    # is cheaper than shipping the text to another process (see bench/prepare_throughput.py).
    parallel_encode: ClassVar[bool] = True

    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    # A Jinja chat template (Hugging Face's `chat_template`) that turns a list of messages into a
    # prompt, or None when the tokenizer has none (then a model offers no chat completions).
    chat_template: str | None = None

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids; every id is in [0, vocab_size)."""

    @abstractmethod
    def encode_array(self, text: str) -> np.ndarray:
        """Encode `text` into a 1-D int64 array (the fast path used by dataset preparation)."""

    @abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """Decode ids already checked to lie in [0, vocab_size)."""

    @abstractmethod
    def artifact(self) -> dict[str, Any]:
        """The JSON content of `tokenizer.json`, without `type` and `format_version`."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """The settings that define this tokenizer (a JSON-able dict, recorded in meta.json)."""

    def extra_files(self) -> dict[str, bytes]:
        """Binary artifacts saved next to tokenizer.json (name -> content)."""
        return {}

    def encode(self, text: str) -> list[int]:
        """Encode `text` into a list of ids."""
        return self.encode_array(text).tolist()

    def prompt_ids(self, text: str) -> list[int]:
        """Ids that start generation from `text`: `encode`, plus any special tokens the tokenizer
        adds to a model input (e.g. a Hugging Face Llama tokenizer's leading bos)."""
        return self.encode(text)

    def decode(self, ids: Sequence[int] | Any) -> str:
        """Decode ids (list, numpy array or tensor) into text."""
        id_list = as_id_list(ids)
        n = self.vocab_size
        bad = [i for i in id_list if not 0 <= i < n]
        if bad:
            raise TokenizerError(
                f"{self.type} tokenizer: id {bad[0]} is out of range for a vocabulary of {n}"
            )
        return self._decode(id_list)

    def save(self, directory: str | Path) -> list[str]:
        """Write the artifacts into `directory` (created if needed); returns the file names."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        names = []
        for name, data in self.extra_files().items():
            atomic_write_bytes(directory / name, data)
            names.append(name)
        atomic_write_json(
            directory / TOKENIZER_FILE,
            {"type": self.type, "format_version": FORMAT_VERSION, **self.artifact()},
        )
        return [*names, TOKENIZER_FILE]

    def decoder(self, max_hold: int = 8) -> IncrementalDecoder:
        """A streaming decoder: feed ids one at a time, get back newly completed text."""
        return IncrementalDecoder(self, max_hold=max_hold)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class IncrementalDecoder:
    """Decode a growing id sequence piece by piece, never emitting half a UTF-8 character.

    Each call decodes a short window (the ids since the last emitted piece plus one piece of left
    context, so that tokenizers whose pieces depend on their neighbours decode correctly) and returns
    only the text that is new. While the window ends in an incomplete multi-byte character (decoded
    as U+FFFD) the ids are held back, up to `max_hold` ids, after which the replacement character is
    emitted (the model really produced invalid bytes).
    """

    def __init__(self, tokenizer: Tokenizer, max_hold: int = 8) -> None:
        self.tokenizer = tokenizer
        self.max_hold = max(1, max_hold)
        self._ids: list[int] = []  # the emitted context piece followed by unemitted ids
        self._read = 0  # ids before this index are already emitted

    def push(self, ids: int | Iterable[int] | Any) -> str:
        """Add one id (or several) and return the text they complete ('' while held back)."""
        self._ids.extend(as_id_list(ids))
        if not self.tokenizer.splits_characters:
            return self._emit()
        prefix = self.tokenizer.decode(self._ids[: self._read])
        text = self.tokenizer.decode(self._ids)
        held = len(self._ids) - self._read
        if len(text) <= len(prefix) or (text.endswith(REPLACEMENT_CHAR) and held < self.max_hold):
            return ""
        return self._advance(text[len(prefix) :])

    def flush(self) -> str:
        """Return whatever is still held back (possibly ending in U+FFFD) and reset."""
        out = self._emit()
        self._ids, self._read = [], 0
        return out

    def _emit(self) -> str:
        prefix = self.tokenizer.decode(self._ids[: self._read])
        text = self.tokenizer.decode(self._ids)
        return self._advance(text[len(prefix) :] if len(text) > len(prefix) else "")

    def _advance(self, out: str) -> str:
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        return out


def read_artifact(directory: Path) -> dict[str, Any]:
    """Parse `directory/tokenizer.json`, raising TokenizerError with the path on any problem."""
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise TokenizerError(
            f"{directory}: no {TOKENIZER_FILE}; expected a saved tokenizer directory "
            "(or a SentencePiece .model file)"
        )
    inside(directory, TOKENIZER_FILE, what="tokenizer", error=TokenizerError)
    data = read_json_bounded(path, what=str(path), error=TokenizerError)
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise TokenizerError(f"{path}: expected a JSON object with a string 'type'")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise TokenizerError(
            f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})"
        )
    return data
