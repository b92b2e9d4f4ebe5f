"""`craft tokenizer train|encode`."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from craft.cli.errors import run_guarded

app = typer.Typer(help="Train and try tokenizers.", no_args_is_help=True)


def tokenizer_files(directory: Path, *, option: str = "--output") -> list[str]:
    """The entries of the tokenizer directory `directory` that Craft wrote, which is all there is.

    Raises unless `tokenizer.json` is Craft's (type and format version) and every other entry is
    the model file it names: what `--force` may delete, and nothing else.
    """
    from craft.data.tokenizers import TOKENIZER_FILE
    from craft.data.tokenizers.base import FORMAT_VERSION
    from craft.errors import ConfigError
    from craft.safety import check_relative, owned_entries, read_json_bounded

    path = directory / TOKENIZER_FILE
    data = read_json_bounded(path, what=f"{option} {path}", error=ConfigError)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("type"), str)
        or data.get("format_version") != FORMAT_VERSION
    ):
        raise ConfigError(
            f"{option} {directory}: its {TOKENIZER_FILE} is not one Craft wrote; --force "
            "replaces only a tokenizer Craft trained; choose another directory"
        )
    listed = {TOKENIZER_FILE}
    model_file = data.get("model_file")
    if model_file is not None:
        listed.add(check_relative(model_file, what=f"{option} {directory}", error=ConfigError))
    return owned_entries(directory, listed, option=option, what="a tokenizer", error=ConfigError)


def _run_train(
    inputs: list[str],
    vocab_size: int,
    model_type: str,
    output: Path,
    character_coverage: float,
    byte_fallback: bool,
    errors: str,
    force: bool,
    quiet: bool,
) -> None:
    import os
    import shutil

    from craft.data.prepare import CHUNK_BYTES, TextStream, resolve_inputs
    from craft.data.progress import quiet as no_progress
    from craft.data.tokenizers import TOKENIZER_FILE, SentencePieceTokenizer
    from craft.data.tokenizers.sentencepiece import MAX_VOCAB_SIZE
    from craft.errors import ConfigError
    from craft.fileio import storage_error
    from craft.safety import check_output_location, remove_owned, staging_dir, unique_sibling

    if model_type not in ("bpe", "unigram"):
        raise ConfigError(f"--model-type {model_type!r}: expected bpe or unigram")
    if not 16 <= vocab_size <= MAX_VOCAB_SIZE:
        raise ConfigError(f"--vocab-size {vocab_size}: expected 16 to {MAX_VOCAB_SIZE:,}")
    if not 0.0 < character_coverage <= 1.0:
        raise ConfigError(f"--character-coverage {character_coverage}: expected (0, 1]")
    if errors not in ("strict", "replace"):
        raise ConfigError(f"--errors {errors!r}: expected strict or replace")
    output = output.expanduser().absolute()

    def check_output() -> list[str]:
        """The entries `--force` will replace (none for a new or empty directory)."""
        check_output_location(output, option="--output", error=ConfigError)
        if not output.exists():
            return []
        if not output.is_dir():
            raise ConfigError(f"--output {output}: exists and is not a directory")
        if (output / TOKENIZER_FILE).exists():
            if not force:
                raise ConfigError(
                    f"--output {output}: already holds a tokenizer; pass --force to replace it"
                )
            return tokenizer_files(output)
        if any(output.iterdir()):
            raise ConfigError(
                f"--output {output}: exists and is not empty; choose another directory"
            )
        return []

    check_output_location(output, option="--output", error=ConfigError)
    files = resolve_inputs(inputs)
    check_output_location(
        output, option="--output", inputs=[f.path for f in files], error=ConfigError
    )
    check_output()
    with no_progress(quiet):
        tok = SentencePieceTokenizer.train(
            TextStream(files, errors, CHUNK_BYTES, "reading text"),
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
        )
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_dir(output.parent, f".{output.name}.training-")
    except OSError as e:
        raise ConfigError(f"--output {output}: cannot create it ({e.strerror or e})") from None
    try:
        names = tok.save(staging)
        owned = check_output()  # again: the directory may have changed during training
        if output.exists():
            old = unique_sibling(output, "replaced")
            os.replace(output, old)
            os.replace(staging, output)
            remove_owned(old, owned)
        else:
            os.replace(staging, output)
    except OSError as e:  # a full disk, permission denied: the staging copy is removed
        err = storage_error(e, f"writing the tokenizer to {output}", name_file=False)
        if err is None:
            raise
        raise err from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    typer.echo(
        f"trained sentencepiece {model_type} tokenizer (vocab {tok.vocab_size}) on "
        f"{len(files)} file(s): {', '.join(str(output / n) for n in names)}"
    )


@app.command("train")
def train_cmd(
    input: list[str] | None = typer.Option(
        None,
        "--input",
        "-i",
        help="Text files, directories, globs or named sources; repeat it or list more after it.",
        show_default=False,
    ),
    more_inputs: list[str] | None = typer.Argument(
        None, help="More inputs (so `--input a.txt b.txt` works).", show_default=False
    ),
    vocab_size: int = typer.Option(2000, "--vocab-size", help="Vocabulary size."),
    model_type: str = typer.Option("bpe", "--model-type", help="bpe or unigram."),
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help="Directory for tokenizer.model + tokenizer.json.",
        show_default=False,
    ),
    character_coverage: float = typer.Option(
        1.0, "--character-coverage", help="Share of characters the vocabulary must cover."
    ),
    byte_fallback: bool = typer.Option(
        True, "--byte-fallback/--no-byte-fallback", help="Unknown characters as UTF-8 bytes."
    ),
    errors: str = typer.Option("strict", "--errors", help="Non-UTF-8 input: strict or replace."),
    force: bool = typer.Option(False, "--force", help="Replace an existing tokenizer."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
) -> None:
    """Train a SentencePiece tokenizer (identity normalization, no dummy prefix, newline piece)."""
    from craft.errors import ConfigError

    def go() -> None:
        inputs = [*(input or []), *(more_inputs or [])]
        if not inputs:
            raise ConfigError("--input is required (text files, directories, globs or sources)")
        if output is None:
            raise ConfigError("--output is required (directory to write the tokenizer to)")
        _run_train(
            inputs, vocab_size, model_type, output, character_coverage, byte_fallback, errors,
            force, quiet,
        )  # fmt: skip

    run_guarded(go)


def _run_encode(tokenizer: Path, text: str, decode: bool) -> None:
    from craft.data.tokenizers import load_tokenizer
    from craft.errors import TokenizerError

    tok = load_tokenizer(tokenizer)
    if decode:
        try:
            ids = [int(x) for x in text.replace(",", " ").split()]
        except ValueError:
            raise TokenizerError(f"--decode: {text!r} is not a list of integer ids") from None
        text = tok.decode(ids)
        if sys.stdout.isatty():  # control characters from the vocabulary are shown, not run
            from craft.safety import printable

            text = printable(text)
        typer.echo(text)
        return
    typer.echo(" ".join(str(i) for i in tok.encode(text)))


@app.command("encode")
def encode_cmd(
    tokenizer: Path = typer.Argument(
        ..., help="Tokenizer dir, prepared dataset dir or .model file.", show_default=False
    ),
    text: str = typer.Argument(..., help="Text to encode (ids with --decode).", show_default=False),
    decode: bool = typer.Option(False, "--decode", help="Decode space-separated ids instead."),
) -> None:
    """Print the ids of TEXT (or the text of ids with --decode)."""
    run_guarded(lambda: _run_encode(tokenizer, text, decode))
