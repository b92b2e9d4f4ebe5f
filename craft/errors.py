"""Errors a user can cause. The CLI prints their message on one line and exits with `exit_code`."""

from __future__ import annotations


class CraftError(Exception):
    """Base for user-facing errors: bad config, data, checkpoint or argument."""

    exit_code: int = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(CraftError):
    """A recipe, fragment or override is invalid. `problems` holds one line per problem."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = problems or []
        full = message if not self.problems else message + "\n" + "\n".join(self.problems)
        super().__init__(full)


class DataError(CraftError):
    """Input text or a prepared dataset is missing, empty, undecodable or inconsistent."""


class TokenizerError(CraftError):
    """A tokenizer cannot be built, loaded, or cannot encode the given text."""


class CheckpointError(CraftError):
    """A checkpoint is missing, incomplete, or does not match the config."""


class KernelError(CraftError):
    """A kernel backend cannot run the given inputs (unsupported shape, dtype or device)."""


class BusyError(CraftError):
    """Another process owns what this one needs (a dataset being prepared, a run directory)."""


class GenerationError(CraftError):
    """Decoding cannot continue: the model's next-token probabilities are not finite."""


class TrainingError(CraftError):
    """The run cannot continue (non-finite loss, diverged gradients)."""


class StorageError(CraftError):
    """The machine refused a write: no space left, quota, permission denied, read-only file system."""
