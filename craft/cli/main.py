"""Entry point of the `craft` command. Heavy imports (torch) happen inside the commands."""

from __future__ import annotations

import typer

from craft import __version__
from craft.cli import (
    bench_cmd,
    config_cmd,
    data_cmd,
    eval_cmd,
    export_cmd,
    generate_cmd,
    model_cmd,
    serve_cmd,
    tokenizer_cmd,
    train_cmd,
)
from craft.cli.errors import debug, fail, run_guarded

app = typer.Typer(
    name="craft",
    help="Build, train, evaluate and sample language models.\n\n"
    "Also runs as `python -m craft` or `python -m craft.cli.run` (the same commands).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"craft {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Craft: config-driven language-model training with fused kernels and safe checkpoints."""


train_cmd.register(app)
app.add_typer(data_cmd.app, name="data")
app.add_typer(data_cmd.app, name="dataset", help="Alias of `craft data`.")
app.add_typer(tokenizer_cmd.app, name="tokenizer")
generate_cmd.register(app)
eval_cmd.register(app)
export_cmd.register(app)
bench_cmd.register(app)
serve_cmd.register(app)
app.add_typer(config_cmd.app, name="config")
app.add_typer(model_cmd.app, name="model")


try:  # typer >= 0.29 carries its own copy of click
    from typer.exceptions import Abort as _Abort
    from typer.exceptions import TyperException as _UsageBase
except ImportError:  # pragma: no cover
    from click.exceptions import Abort as _Abort
    from click.exceptions import ClickException as _UsageBase


def main() -> None:
    """Run the app; a wrong argument or command becomes a one-line `error:` with exit code 2."""
    try:
        rc = run_guarded(lambda: app(standalone_mode=False))
    except _UsageBase as e:
        if debug() or type(e).__name__ == "NoArgsIsHelpError" or not hasattr(e, "format_message"):
            if debug():
                raise
            e.show()  # `craft` alone prints the help
            raise SystemExit(getattr(e, "exit_code", 2)) from None
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        fail(f"{e.format_message()}{hint}", getattr(e, "exit_code", 2))
    except _Abort:
        fail("aborted", 130)
    if isinstance(rc, int) and rc != 0:
        raise SystemExit(rc)


if __name__ == "__main__":
    main()
