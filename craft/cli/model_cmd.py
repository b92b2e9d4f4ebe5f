"""`craft model info RECIPE [key=value ...]`: size, FLOPs and memory of a recipe's model.

Built-in models are counted arithmetically from the config (any size answers at once); a plugin
model is built on the meta device, without allocating its weights. Torch is imported inside the
command only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from craft.cli.errors import run_guarded

app = typer.Typer(help="Inspect models.", no_args_is_help=True)

RECIPE = typer.Argument(
    ..., help="Recipe TOML file, or a recipe name (see `craft config list`).", show_default=False
)
OVERRIDES = typer.Argument(
    None, help="Overrides: section.key=value (value parsed as TOML).", show_default=False
)
ASSUMED_VOCAB = 256


def _prepared_vocab(cfg: Any) -> tuple[int, str] | None:
    """The vocabulary of the recipe's prepared dataset when it exists (nothing is prepared)."""
    if cfg.data.type != "tokens":
        return None
    from craft.data.datasets import PreparedDataset
    from craft.data.prepare import default_dataset_dir, is_prepared, tokenizer_matches
    from craft.errors import CraftError

    try:
        d = Path(cfg.data.dir).expanduser() if cfg.data.dir else None
        d = d or default_dataset_dir(cfg.data, cfg.tokenizer)
        if not is_prepared(d):
            return None
        ds = PreparedDataset(d)
        if not tokenizer_matches(ds.meta, cfg.tokenizer):
            return None
    except CraftError:  # e.g. data.files that do not exist yet: no prepared dataset to read
        return None
    return ds.vocab_size, f"the tokenizer of the prepared dataset {d}"


def _tokenizer_vocab(cfg: Any) -> tuple[int, str] | None:
    """The vocabulary size the tokenizer gives, when it is known without preparing data."""
    from craft.data.tokenizers import load_tokenizer

    found = _prepared_vocab(cfg)
    if found is not None:
        return found
    tcfg = cfg.tokenizer
    if tcfg.type == "bytes":
        from craft.config import registry

        return registry.build("tokenizer", tcfg, None, None).vocab_size, "the bytes tokenizer"
    if tcfg.type == "sentencepiece":
        if tcfg.model:
            return load_tokenizer(tcfg.model).vocab_size, f"the SentencePiece model {tcfg.model}"
        return tcfg.vocab_size, "tokenizer.vocab_size (the size it will be trained to)"
    return None


def resolve_vocab_size(cfg: Any, option: int | None) -> tuple[int, str]:
    """(vocab size, where it came from): model.vocab_size, --vocab-size, the data, or assumed."""
    if getattr(cfg.model, "vocab_size", None):
        return cfg.model.vocab_size, "model.vocab_size"
    if option is not None:
        return option, "--vocab-size"
    if cfg.data.type == "random":
        return cfg.data.vocab_size, "data.vocab_size"
    found = _tokenizer_vocab(cfg)
    if found is not None:
        return found
    return ASSUMED_VOCAB, (
        f"ASSUMED: no prepared dataset yet, so the {cfg.tokenizer.type} tokenizer's size is "
        f"unknown; pass --vocab-size N or model.vocab_size=N for exact numbers"
    )


def _human(n: float, unit: str = "") -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _bytes(n: float) -> str:
    for factor, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= factor:
            return f"{n / factor:.2f} {suffix}"
    return f"{n:.0f} B"


def _info(recipe: Path, overrides: list[str], vocab_option: int | None) -> None:
    from craft.cli.config_cmd import resolved
    from craft.config import load_config

    cfg = load_config(recipe, overrides)  # a bad recipe fails here, before torch is imported
    cfg = resolved(cfg)  # model.init_from: the pretrained model's shape

    import torch
    from rich.console import Console
    from rich.table import Table

    from craft import ops
    from craft.models import flops

    vocab, vocab_from = resolve_vocab_size(cfg, vocab_option)
    fused = cfg.kernels.fused_loss
    model = flops.describe(cfg.model, vocab, fused_loss=fused)  # arithmetic for built-ins
    seq_len = getattr(model, "block_size", None) or cfg.model.block_size  # RNN: training window
    counts = flops.count_params(model)
    attn = flops.attention_flops_per_token(model, seq_len)
    per_token = flops.flops_per_token(model, seq_len)
    tr = cfg.training
    tokens_per_step = tr.batch_size * tr.grad_accum_steps * seq_len
    opt = cfg.optimizer
    try:
        mem = flops.estimate_memory(
            model,
            tr.batch_size,
            seq_len,
            tr.precision,
            opt.type,
            getattr(opt, "momentum", 0.0),
            fused,
        )
    except TypeError as e:  # a plugin model: no formula for its activations
        mem, no_mem = None, str(e)

    console = Console()
    shape = ", ".join(
        f"{k}={v}" for k, v in cfg.model.model_dump().items() if k not in ("type", "vocab_size")
    )
    console.print(f"[bold]{cfg.model.type}[/bold] model of {recipe}: {shape}")
    style = "yellow" if vocab_from.startswith("ASSUMED") else "dim"
    console.print(f"vocab_size = {vocab}  [{style}](from {vocab_from})[/{style}]")

    t = Table(title="Parameters", title_justify="left")
    t.add_column("", style="bold")
    t.add_column("count", justify="right")
    t.add_column("")
    t.add_row("total", f"{counts.total:,}", _human(counts.total))
    t.add_row("embedding", f"{counts.embedding:,}", "token + position lookup tables")
    t.add_row("non-embedding", f"{counts.non_embedding:,}", _human(counts.non_embedding))
    console.print(t)

    t = Table(title="Training FLOPs", title_justify="left")
    t.add_column("", style="bold")
    t.add_column("value", justify="right")
    t.add_column("")
    t.add_row("N (matmul params)", f"{counts.matmul:,}", "non-embedding + a tied output layer")
    t.add_row("6N", f"{6 * counts.matmul:,}", "forward 2N + backward 4N per token")
    if attn:
        c = cfg.model
        t.add_row(
            "12·L·H·hs·T",
            f"{attn:,}",
            f"attention: L={c.n_layer}, H={c.n_head}, hs={c.d_model // c.n_head}, T={seq_len}",
        )
    t.add_row("per token", f"{per_token:,}", _human(per_token, "FLOP"))
    t.add_row(
        "per optimizer step",
        f"{per_token * tokens_per_step:,}",
        f"{tokens_per_step:,} tokens (batch {tr.batch_size} x accum {tr.grad_accum_steps} x T)",
    )
    console.print(t)
    console.print("FLOPs per token = 6N + 12·L·H·hs·T (the MFU formula of nanoGPT and torchtitan).")

    if mem is None:
        console.print(f"Training memory estimate: n/a ({no_mem})")
    else:
        t = Table(title="Training memory estimate", title_justify="left")
        t.add_column("", style="bold")
        t.add_column("bytes", justify="right")
        t.add_row("weights (fp32)", _bytes(mem.weights))
        t.add_row("gradients (fp32)", _bytes(mem.gradients))
        t.add_row("optimizer state", _bytes(mem.optimizer))
        t.add_row("activations", _bytes(mem.activations))
        t.add_row("total", _bytes(mem.total))
        console.print(t)
    console.print(
        f"At batch {tr.batch_size} x T {seq_len}, precision {tr.precision}, {opt.type}"
        f"{', fused loss' if fused else ''}; activations assume fused attention (no T x T "
        "scores kept) and exclude allocator overhead."
    )

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    t = Table(title="Kernel backends on this machine", title_justify="left")
    t.add_column("op", style="bold")
    t.add_column("selected")
    for d in devices:
        t.add_column(f"runs on {d}")
    t.add_column("backends")
    table = ops.Kernels(cfg.kernels)
    for op in ops.OPS:
        avail = ops.availability(op)
        listed = "; ".join(
            f"{name}: ok" if why is None else f"{name}: unavailable ({why})"
            for name, why in avail.items()
        )
        name = table.names[op]
        t.add_row(op, name, *(ops.choose(op, d, name) for d in devices), listed)
    console.print(t)
    console.print(ops.describe_auto())
    for mod, why in ops.unloaded_backends().items():
        console.print(f"[dim]backend module {mod} not loaded: {why}[/dim]")


@app.command("info")
def info(
    recipe: Path = RECIPE,
    overrides: list[str] | None = OVERRIDES,
    vocab_size: int | None = typer.Option(
        None,
        "--vocab-size",
        min=1,
        help="Vocabulary size when model.vocab_size is not set (default: the prepared "
        "dataset's tokenizer, else an assumption that the output states).",
    ),
) -> None:
    """Parameter counts, training FLOPs per token and a memory estimate of a recipe's model."""
    run_guarded(lambda: _info(recipe, overrides or [], vocab_size))
