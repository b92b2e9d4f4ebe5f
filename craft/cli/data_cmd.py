"""`craft data prepare|info|sources` (also reachable as `craft dataset ...`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from craft.cli.errors import run_guarded

app = typer.Typer(help="Prepare and inspect token datasets.", no_args_is_help=True)

_SP_ONLY = ("--tokenizer-model", "--vocab-size", "--model-type")


def _tokenizer_config(
    name: str, model: Path | None, vocab_size: int | None, model_type: str | None, unk: bool
) -> Any:
    """The tokenizer config section described by the command-line options."""
    from pydantic import ValidationError

    from craft.config import registry
    from craft.errors import ConfigError

    known = registry.names("tokenizer")
    if name not in known:
        raise ConfigError(f"--tokenizer {name!r}: expected one of {', '.join(known)}")
    given = dict(zip(_SP_ONLY, (model, vocab_size, model_type), strict=True))
    kwargs: dict[str, Any] = {}
    if name == "sentencepiece":
        kwargs = {
            k: v
            for k, v in {
                "model": str(model) if model else None,
                "vocab_size": vocab_size,
                "model_type": model_type,
            }.items()
            if v is not None
        }
    else:
        extra = [opt for opt, v in given.items() if v is not None]
        if extra:
            raise ConfigError(f"{extra[0]} applies to --tokenizer sentencepiece only")
    if unk:
        if name != "char":
            raise ConfigError("--unk applies to --tokenizer char only")
        kwargs["unk"] = True
    cls = registry.get("tokenizer", name).config_cls
    try:
        return cls(**kwargs)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "tokenizer"
        option = "--" + field.replace("_", "-")
        msg = err["msg"].replace("Input should be ", "expected ")
        raise ConfigError(f"{option} {err.get('input')!r}: {msg}") from None


def _run_prepare(
    inputs: list[str],
    output_dir: Path | None,
    tokenizer: str | None,
    tokenizer_model: Path | None,
    vocab_size: int | None,
    model_type: str | None,
    unk: bool,
    val_fraction: float | None,
    workers: int | None,
    force: bool,
    errors: str | None,
    config: Path | None,
    quiet: bool,
    text_field: str | None = None,
) -> None:
    from craft.cli.generate_cmd import stderr_logging
    from craft.data.prepare import default_dataset_dir, prepare
    from craft.errors import ConfigError

    stderr_logging()  # warnings (e.g. skipped records) as `warning: ...` lines

    if config is not None:
        from craft.config import load_config

        clash = [
            opt
            for opt, v in (
                ("--input", inputs),
                ("--tokenizer", tokenizer),
                ("--tokenizer-model", tokenizer_model),
                ("--vocab-size", vocab_size),
                ("--model-type", model_type),
                ("--unk", unk or None),
            )
            if v
        ]
        if clash:
            raise ConfigError(
                f"{clash[0]} cannot be combined with --config (the recipe's data and tokenizer "
                "sections say what to prepare)"
            )
        cfg = load_config(config)
        data, tok_cfg = cfg.data, cfg.tokenizer
        if data.type != "tokens":
            raise ConfigError(
                f"{config}: data.type = {data.type!r} has nothing to prepare (expected 'tokens')"
            )
        if not data.source and not data.files:
            raise ConfigError(f"{config}: set data.source or data.files to say what to prepare")
        inputs = [data.source] if data.source else list(data.files)
        if output_dir is None and data.dir:
            output_dir = Path(data.dir)
        elif output_dir is None:
            from craft.paths import cache_dir

            cache_dir("datasets", error=ConfigError)  # refused if another user could write it
            output_dir = default_dataset_dir(data, tok_cfg)
        val_fraction = data.val_fraction if val_fraction is None else val_fraction
        errors = data.errors if errors is None else errors
        text_field = data.text_field if text_field is None else text_field
    else:
        if not inputs:
            raise ConfigError(
                "--input is required (a file, directory, glob or named source), or --config RECIPE"
            )
        if tokenizer is None and tokenizer_model is not None:
            tokenizer = "sentencepiece"
        if tokenizer is None:
            raise ConfigError("--tokenizer is required: char, sentencepiece or bytes")
        if output_dir is None:
            raise ConfigError("--output-dir is required (or --config RECIPE)")
        tok_cfg = _tokenizer_config(tokenizer, tokenizer_model, vocab_size, model_type, unk)
    meta = prepare(
        inputs,
        output_dir,
        tok_cfg,
        val_fraction=0.1 if val_fraction is None else val_fraction,
        workers=workers,
        force=force,
        errors=errors or "strict",
        progress=not quiet,
        text_field=text_field or "text",
    )
    splits = meta["splits"]
    typer.echo(
        f"prepared {output_dir}: train {splits['train']['tokens']:,} tokens, "
        f"val {splits['val']['tokens']:,} tokens ({meta['dtype']}, vocab {meta['vocab_size']}, "
        f"{meta['tokenizer']['type']}) from {len(meta['sources'])} file(s) in "
        f"{meta['prepare_seconds']:.1f}s"
    )
    records = meta.get("records")
    if records is not None:
        skipped = records["skipped"]
        typer.echo(
            f"records: {records['records']:,} read from field {records['text_field']!r}"
            + (f", {sum(skipped.values()):,} bad record(s) skipped" if skipped else "")
        )


@app.command("prepare")
def prepare_cmd(
    input: list[str] | None = typer.Option(
        None,
        "--input",
        "-i",
        help="Text file, JSON Lines (.jsonl, .jsonl.gz, .json.gz) or Parquet file, directory "
        "(its text/JSONL/Parquet files), glob, or named source (tinyshakespeare). Repeat it, or "
        "list more paths after it.",
        show_default=False,
    ),
    more_inputs: list[str] | None = typer.Argument(
        None, help="More inputs (so `--input a.txt b.txt` works).", show_default=False
    ),
    output_dir: Path | None = typer.Option(
        None, "--output-dir", "-o", help="Directory to create.", show_default=False
    ),
    tokenizer: str | None = typer.Option(
        None,
        "--tokenizer",
        "-t",
        "--tokenizer-type",
        help="char, sentencepiece or bytes (--tokenizer-type is an alias).",
        show_default=False,
    ),
    tokenizer_model: Path | None = typer.Option(
        None,
        "--tokenizer-model",
        help="SentencePiece .model file (or saved tokenizer dir); without it one is trained.",
        show_default=False,
    ),
    vocab_size: int | None = typer.Option(
        None,
        "--vocab-size",
        help="SentencePiece vocabulary to train (default 2000).",
        show_default=False,
    ),
    model_type: str | None = typer.Option(
        None,
        "--model-type",
        help="SentencePiece algorithm to train: bpe or unigram (default bpe).",
        show_default=False,
    ),
    unk: bool = typer.Option(
        False, "--unk", help="char: map characters unseen in the data to <unk>."
    ),
    val_fraction: float | None = typer.Option(
        None,
        "--val-fraction",
        help="Tail of the token stream kept for validation (default 0.1).",
        show_default=False,
    ),
    workers: int | None = typer.Option(
        None,
        "--workers",
        "-w",
        help="Encoding processes (default: all cores for sentencepiece; 1 for char and bytes, which encode faster in-process).",
        show_default=False,
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing prepared dataset."),
    errors: str | None = typer.Option(
        None,
        "--errors",
        help="Bad input: strict (fail naming the file and byte offset or record), replace "
        "(non-UTF-8 bytes become U+FFFD) or skip (skip bad JSONL/Parquet records, counted) "
        "(default strict).",
        show_default=False,
    ),
    text_field: str | None = typer.Option(
        None,
        "--text-field",
        help="JSONL/Parquet inputs: the field that holds each record's text (default text).",
        show_default=False,
    ),
    config: Path | None = typer.Option(
        None,
        "--config",
        "-c",
        help="Recipe or data config: prepare its data and tokenizer sections.",
        show_default=False,
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
) -> None:
    """Tokenize text, JSON Lines or Parquet into train.bin / val.bin / meta.json (streamed, parallel, atomic)."""
    run_guarded(
        lambda: _run_prepare(
            [*(input or []), *(more_inputs or [])],
            output_dir,
            tokenizer,
            tokenizer_model,
            vocab_size,
            model_type,
            unk,
            val_fraction,
            workers,
            force,
            errors,
            config,
            quiet,
            text_field,
        )
    )


def _run_info(path: Path) -> None:
    from craft.data.datasets import PreparedDataset
    from craft.safety import printable

    def show(v: Any) -> str:  # text from meta.json: control characters escaped, never executed
        return printable(v, newlines=False)

    ds = PreparedDataset(path)
    m = ds.meta
    tok = m["tokenizer"]
    typer.echo(f"dataset     {show(ds.path)}")
    typer.echo(
        f"tokenizer   {show(tok.get('type'))} (vocab {m['vocab_size']}), ids stored as {m['dtype']}"
    )
    for split in ("train", "val"):
        typer.echo(f"{split:<11} {ds.num_tokens(split):,} tokens")
    typer.echo(f"ids         all below the vocabulary size {m['vocab_size']} (checked)")
    typer.echo(f"val share   {show(m.get('val_fraction', '?'))}")
    for src in m.get("sources", []):
        typer.echo(
            f"source      {show(src['name'])} ({src['bytes']:,} bytes, sha256 "
            f"{show(src['sha256'][:16])}…)"
        )
    rec = m.get("records")
    if isinstance(rec, dict):
        sep = rec.get("separator", {})
        sep_text = f"id {sep['id']}" if "id" in sep else repr(sep.get("text"))
        skipped = sum(rec.get("skipped", {}).values())
        typer.echo(
            f"records     {rec.get('records', 0):,} from field {rec.get('text_field')!r}, "
            f"separator {sep_text}, {skipped:,} skipped"
        )
    typer.echo(
        f"created     {show(m.get('created', '?'))} by craft {show(m.get('craft_version', '?'))}"
    )


@app.command("info")
def info_cmd(
    path: Path = typer.Argument(..., help="Prepared dataset directory.", show_default=False),
) -> None:
    """Validate a prepared dataset and print its summary."""
    run_guarded(lambda: _run_info(path))


@app.command("sources")
def sources_cmd() -> None:
    """List the named sources that --input and data.source accept."""
    from craft.data.sources import describe_sources

    for name, description in describe_sources():
        typer.echo(f"{name:<18} {description}")
