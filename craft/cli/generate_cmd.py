"""`craft generate --checkpoint PATH --prompt TEXT [options]`: sample text from a trained model."""

from __future__ import annotations

import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Any

import typer

MAX_SEED = 2**63 - 1  # as craft.config.sections.MAX_SEED (not imported: --help stays fast)

SEPARATOR = "---------------"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Output(str, Enum):
    """What `craft generate` produces; `text` is the only kind, accepted for `generate text`."""

    text = "text"


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


# Options shared with `craft eval`.
CHECKPOINT = typer.Option(
    ...,
    "--checkpoint",
    help="Run directory (its latest checkpoint), checkpoint directory, a checkpoints/latest "
    "pointer, exported model, or a Hugging Face model directory or Hub id.",
    show_default=False,
)
DEVICE = typer.Option(Device.auto, "--device", help="Where to run.")
TRUST_IMPORTS = typer.Option(
    False,
    "--trust-imports",
    help="Import the Python modules the checkpoint's config names (runs their code; only for "
    "checkpoints you trust). Without it such a checkpoint is refused.",
)


def stderr_logging() -> None:
    """Show Craft's warnings (e.g. a cropped prompt) as `warning: ...` lines on stderr."""
    logger = logging.getLogger("craft")
    if any(getattr(h, "_craft_cli", False) for h in logger.handlers):
        return

    class _Lower(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            from craft.safety import printable

            return f"{record.levelname.lower()}: {printable(record.getMessage())}"

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Lower())
    handler.setLevel(logging.WARNING)
    handler._craft_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(min(logger.level or logging.WARNING, logging.WARNING))


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """The prompt text from --prompt or --prompt-file (UTF-8); empty when neither is given."""
    from craft.errors import ConfigError

    if prompt is not None and prompt_file is not None:
        raise ConfigError("--prompt and --prompt-file: give one of them, not both")
    if prompt_file is None:
        return prompt or ""
    from craft.safety import MAX_PROMPT_BYTES, read_text_bounded

    # A FIFO or /dev/zero is refused and the size bounded: a prompt longer than any context
    # is cropped anyway.
    return read_text_bounded(
        prompt_file, MAX_PROMPT_BYTES, what=f"--prompt-file {prompt_file}", error=ConfigError
    )


class _Escaping:
    """A terminal stream that shows control characters of model output (an escape sequence the
    model or a doctored vocabulary produces) as text instead of executing them."""

    def __init__(self, stream: Any, clean: Any) -> None:
        self.stream, self.clean = stream, clean

    def write(self, text: str) -> int:
        return self.stream.write(self.clean(text))

    def flush(self) -> None:
        self.stream.flush()


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate(
        output: Output | None = typer.Argument(
            None,
            metavar="text",
            help="Optional: `craft generate text ...` is an alias of `craft generate ...`.",
            show_default=False,
        ),
        checkpoint: Path = CHECKPOINT,
        prompt: str | None = typer.Option(
            None,
            "--prompt",
            help="Text to continue; empty starts from the start token or a newline.",
            show_default=False,
        ),
        prompt_file: Path | None = typer.Option(
            None, "--prompt-file", help="Read the prompt from this UTF-8 file.", show_default=False
        ),
        max_new_tokens: int = typer.Option(
            200, "--max-new-tokens", min=0, help="Tokens to generate per sample."
        ),
        temperature: float = typer.Option(
            1.0, "--temperature", min=0.0, help="Softmax temperature; 0 is greedy (argmax)."
        ),
        top_k: int | None = typer.Option(
            None, "--top-k", min=1, help="Sample from the k most likely tokens only."
        ),
        top_p: float | None = typer.Option(
            None,
            "--top-p",
            help="Sample from the smallest set of tokens whose probability reaches p (0 < p <= 1).",
        ),
        seed: int | None = typer.Option(
            None,
            "--seed",
            min=0,
            max=MAX_SEED,
            help="Random seed; without one a seed is drawn and printed.",
        ),
        num_samples: int = typer.Option(1, "--num-samples", min=1, help="Samples to draw."),
        stream: bool | None = typer.Option(
            None,
            "--stream/--no-stream",
            help="Print text as it is generated (default: stream when stdout is a terminal).",
            show_default=False,
        ),
        device: Device = DEVICE,
        dtype: DType = typer.Option(DType.float32, "--dtype", help="Weights and cache dtype."),
        compile_step: bool = typer.Option(
            False,
            "--compile",
            help="Compile the decode step with torch.compile (fixed-shape KV cache); the first "
            "token waits for the compiler. See bench/results/decode_speed.md for when it pays.",
        ),
        trust_imports: bool = TRUST_IMPORTS,
    ) -> None:
        """Sample text from a checkpoint (KV-cached decoding; stops at max tokens or end-of-text)."""
        from craft.cli.errors import run_guarded

        def run() -> None:
            import random

            stderr_logging()
            text = read_prompt(prompt, prompt_file)  # before the slow torch import

            from craft.errors import CheckpointError, GenerationError
            from craft.generation import SamplingParams, resolve_device, resolve_dtype
            from craft.generation import generate as sample
            from craft.training.checkpoint import load_model, resolve_source

            SamplingParams(temperature, top_k, top_p)  # bad values fail before loading
            dev = resolve_device(device.value)
            ck = resolve_source(checkpoint)  # a run directory: its newest complete checkpoint
            model, tokenizer, _ = load_model(
                ck, device=dev, dtype=resolve_dtype(dtype.value), trust_imports=trust_imports
            )
            sys.stderr.write(f"checkpoint: {ck}\n")
            use_seed = seed
            if use_seed is None:
                use_seed = random.SystemRandom().randrange(2**31)
                if temperature > 0:  # greedy decoding draws no random numbers
                    sys.stderr.write(f"seed: {use_seed}\n")
            from craft.safety import printable

            streaming = sys.stdout.isatty() if stream is None else stream
            out = _Escaping(sys.stdout, printable) if sys.stdout.isatty() else sys.stdout

            def header(i: int) -> None:
                if i > 0:
                    out.write(f"\n{SEPARATOR}\n")
                out.write(text)

            current = [-1]

            def on_text(i: int, piece: str) -> None:
                while current[0] < i:
                    current[0] += 1
                    header(current[0])
                out.write(piece)
                out.flush()

            try:
                texts = sample(
                    model,
                    tokenizer,
                    text,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    seed=use_seed,
                    num_samples=num_samples,
                    on_text=on_text if streaming else None,
                    compile=compile_step,
                )
            except GenerationError:
                hint = " (float16 overflows easily: try --dtype bfloat16)" * (
                    dtype.value == "float16"
                )
                raise CheckpointError(
                    f"{ck}: the model's next-token probabilities are not finite (NaN or inf) "
                    f"although its weights are{hint}"
                ) from None
            if streaming:
                while current[0] < num_samples - 1:  # samples that produced no text
                    current[0] += 1
                    header(current[0])
            else:
                for i, t in enumerate(texts):
                    header(i)
                    out.write(t)
            out.write("\n")
            out.flush()

        run_guarded(run)
