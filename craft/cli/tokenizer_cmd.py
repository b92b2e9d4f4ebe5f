"""`craft tokenizer train|encode`."""

from __future__ import annotations

from pathlib import Path

import typer

from craft.cli.errors import run_guarded

app = typer.Typer(help="Train and try tokenizers.", no_args_is_help=True)


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
    import shutil

    from craft.data.prepare import CHUNK_BYTES, TextStream, resolve_inputs
    from craft.data.progress import quiet as no_progress
    from craft.data.tokenizers import TOKENIZER_FILE, SentencePieceTokenizer
    from craft.errors import ConfigError

    if model_type not in ("bpe", "unigram"):
        raise ConfigError(f"--model-type {model_type!r}: expected bpe or unigram")
    if vocab_size < 16:
        raise ConfigError(f"--vocab-size {vocab_size}: expected at least 16")
    if not 0.0 < character_coverage <= 1.0:
        raise ConfigError(f"--character-coverage {character_coverage}: expected (0, 1]")
    if errors not in ("strict", "replace"):
        raise ConfigError(f"--errors {errors!r}: expected strict or replace")
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output}: exists and is not a directory")
    if (output / TOKENIZER_FILE).exists() and not force:
        raise ConfigError(
            f"--output {output}: already holds a tokenizer; pass --force to replace it"
        )
    if output.is_dir() and any(output.iterdir()) and not (output / TOKENIZER_FILE).exists():
        raise ConfigError(f"--output {output}: exists and is not empty; choose another directory")
    files = resolve_inputs(inputs)
    with no_progress(quiet):
        tok = SentencePieceTokenizer.train(
            TextStream(files, errors, CHUNK_BYTES, "reading text"),
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
        )
    staging = output.parent / f".{output.name}.training"
    shutil.rmtree(staging, ignore_errors=True)
    names = tok.save(staging)
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)
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
        typer.echo(tok.decode(ids))
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
