"""`craft serve --checkpoint PATH [options]`: an OpenAI-compatible HTTP server."""

from __future__ import annotations

from pathlib import Path

import typer

from craft.cli.generate_cmd import CHECKPOINT, DEVICE, Device, DType


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        checkpoint: Path = CHECKPOINT,
        host: str = typer.Option(
            "127.0.0.1", "--host", help="Address to listen on (other than loopback: use a key)."
        ),
        port: int = typer.Option(8000, "--port", min=0, max=65535, help="0 picks a free port."),
        device: Device = DEVICE,
        dtype: DType = typer.Option(DType.float32, "--dtype", help="Weights and cache dtype."),
        max_batch_size: int = typer.Option(
            8, "--max-batch-size", min=1, help="Sequences decoded together at most."
        ),
        max_queue: int = typer.Option(
            64, "--max-queue", min=1, help="Requests waiting at most; beyond it: 503."
        ),
        max_tokens_limit: int = typer.Option(
            4096, "--max-tokens-limit", min=1, help="Largest max_tokens a request may ask for."
        ),
        api_key_env: str | None = typer.Option(
            None,
            "--api-key-env",
            help="Require 'Authorization: Bearer <key>' with the key in this environment variable.",
            show_default=False,
        ),
        model_name: str | None = typer.Option(
            None,
            "--model-name",
            help="Name clients use (default: the run name).",
            show_default=False,
        ),
        chat_template: Path | None = typer.Option(
            None,
            "--chat-template",
            help="Jinja chat template file for /v1/chat/completions (default: the tokenizer's).",
            show_default=False,
        ),
        log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
        threads: int | None = typer.Option(
            None,
            "--threads",
            min=1,
            help="Torch threads of the model (default on the CPU: OMP_NUM_THREADS if set, else "
            "all cores but one, left to the HTTP event loop).",
            show_default=False,
        ),
    ) -> None:
        """Serve a checkpoint over the OpenAI HTTP API (completions, chat, streaming)."""
        from craft.cli.errors import run_guarded

        def run() -> None:
            from craft.cli.generate_cmd import stderr_logging
            from craft.serving.server import serve as start

            stderr_logging()
            start(
                checkpoint,
                host=host,
                port=port,
                device=device.value,
                dtype=dtype.value,
                max_batch_size=max_batch_size,
                max_queue=max_queue,
                max_tokens_limit=max_tokens_limit,
                api_key_env=api_key_env,
                model_name=model_name,
                chat_template=chat_template,
                log_level=log_level,
                threads=threads,
            )

        run_guarded(run)
