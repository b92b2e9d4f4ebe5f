"""`craft bench attention|cross-entropy|linear-cross-entropy|norm|train|all`.

Every kernel implementation is checked against a float64 reference before it is timed; a wrong
result is flagged and never timed. torch is imported inside the commands only.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import typer

from craft.cli.generate_cmd import MAX_SEED

KERNELS = ("attention", "cross-entropy", "linear-cross-entropy", "norm")
_SHAPES = "Comma-separated list; default depends on the device and --quick."

DEVICE = typer.Option("auto", "--device", help="auto (cuda when available), cpu or cuda.")
DTYPE = typer.Option(
    "auto", "--dtype", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16."
)
MODE = typer.Option("fwd+bwd", "--mode", help="fwd, bwd or fwd+bwd.")
CAUSAL = typer.Option(True, "--causal/--no-causal", help="Causal attention.")
BATCH = typer.Option(None, "--batch", help=f"Batch sizes. {_SHAPES}")
HEADS = typer.Option(None, "--heads", help=f"Attention query heads. {_SHAPES}")
KV_HEADS = typer.Option(
    None, "--kv-heads", help="Attention key/value heads (grouped-query); default: --heads."
)
SEQ_LENS = typer.Option(
    None, "--seq-lens", help=f"Sequence lengths (tokens = batch x seq len). {_SHAPES}"
)
HEAD_DIM = typer.Option(None, "--head-dim", help=f"Attention head dims. {_SHAPES}")
VOCAB = typer.Option(None, "--vocab", help=f"Vocabulary sizes (cross-entropy). {_SHAPES}")
HIDDEN = typer.Option(
    None, "--hidden", help=f"Hidden sizes (linear-cross-entropy, norm). {_SHAPES}"
)
NORM_KIND = typer.Option(None, "--norm-kind", help="layernorm, rmsnorm or both (comma-separated).")
RESIDUAL = typer.Option(False, "--residual/--no-residual", help="Norm fused with a residual add.")
IMPLS = typer.Option(
    None, "--impls", help="Implementations to run: comma-separated names or globs (craft.*)."
)
COMPILE = typer.Option(
    None, "--compile/--no-compile", help="torch.compile implementations (default: off in --quick)."
)
THREADS = typer.Option(
    None, "--threads", help="CPU threads for torch (1 gives steadier numbers on a busy machine)."
)
SEED = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="Seed of the random inputs.")
JSON_OUT = typer.Option(None, "--json", help="Write the results as JSON to this path.")
PLOT_OUT = typer.Option(
    None, "--plot", help="Write a PNG plot of throughput against the swept size."
)
QUICK = typer.Option(False, "--quick", help="Tiny shapes and short timing (a smoke test).")
IMPORTS = typer.Option(
    None, "--import", help="Module to import first (registers extra implementations)."
)
STEPS = typer.Option(None, "--steps", help="Timed training steps (default 20, --quick 3).")
WARMUP = typer.Option(None, "--warmup", help="Untimed warm-up steps (default 3, --quick 1).")
NOTE = typer.Option(None, "--note", help="A remark stored in the JSON (e.g. machine conditions).")


def _ints(option: str, text: str | None) -> list[int] | None:
    """Parse '128,256' into [128, 256]; a bad value is a one-line error."""
    from craft.cli.errors import fail

    if text is None:
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            fail(f"{option} {text!r}: {part!r} is not a positive integer (expected e.g. 128,256)")
        out.append(int(part))
    return out


def _settings(a: dict[str, Any]) -> Any:
    """Validate the kernel options and build `craft.bench.Settings` (imports torch)."""
    from craft.cli.errors import fail

    shapes = {
        "batch": _ints("--batch", a["batch"]),
        "heads": _ints("--heads", a["heads"]),
        "kv_heads": _ints("--kv-heads", a["kv_heads"]),
        "seq_lens": _ints("--seq-lens", a["seq_lens"]),
        "head_dim": _ints("--head-dim", a["head_dim"]),
        "vocab": _ints("--vocab", a["vocab"]),
        "hidden": _ints("--hidden", a["hidden"]),
    }
    if a["mode"] not in ("fwd", "bwd", "fwd+bwd"):
        fail(f"--mode {a['mode']!r}: expected fwd, bwd or fwd+bwd")
    kinds = None
    if a["norm_kind"]:
        kinds = [k.strip() for k in a["norm_kind"].split(",")]
        bad = [k for k in kinds if k not in ("layernorm", "rmsnorm")]
        if bad:
            fail(f"--norm-kind {a['norm_kind']!r}: {bad[0]!r} is not layernorm or rmsnorm")
    if shapes["kv_heads"]:
        heads = shapes["heads"] or []
        for h in heads:
            for kv in shapes["kv_heads"]:
                if h % kv:
                    fail(f"--kv-heads {kv}: must divide every --heads value (got {h})")
        if not heads:
            fail("--kv-heads needs --heads (the default heads differ per device)")
    if a["threads"] is not None and a["threads"] < 1:
        fail(f"--threads {a['threads']}: expected a positive integer")
    _imports(a.get("imports"))

    import torch

    from craft.bench import DTYPES, Settings

    if a["threads"]:
        torch.set_num_threads(a["threads"])
    device_arg = a["device"]
    if device_arg == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif device_arg in ("cpu", "cuda"):
        if device_arg == "cuda" and not torch.cuda.is_available():
            fail("--device cuda: CUDA is not available on this machine")
        device = torch.device(device_arg)
    else:
        fail(f"--device {device_arg!r}: expected auto, cpu or cuda")
    if a["dtype"] == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif a["dtype"] in DTYPES:
        dtype = DTYPES[a["dtype"]]
    else:
        fail(f"--dtype {a['dtype']!r}: expected auto, float32, bfloat16 or float16")
    impls = [p.strip() for p in a["impls"].split(",")] if a["impls"] else None
    return Settings(
        device=device,
        dtype=dtype,
        mode=a["mode"],
        causal=a["causal"],
        quick=a["quick"],
        norm_kinds=kinds,
        residual=a["residual"],
        impls=impls,
        compile=a["compile"],
        seed=a["seed"],
        **shapes,
    )


def _imports(modules: list[str] | None) -> None:
    import importlib

    from craft.cli.errors import fail

    for mod in modules or []:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            fail(f"--import {mod}: cannot import module ({e})")


def _check_outputs(a: dict[str, Any]) -> None:
    from craft.cli.errors import fail

    plot = a.get("plot")
    if plot is not None and Path(plot).suffix.lower() not in (".png", ".svg", ".pdf"):
        fail(f"--plot {plot}: expected a .png (or .svg, .pdf) path")
    for opt in ("json", "plot"):
        path = a.get(opt)
        if path is not None and Path(path).is_dir():
            fail(f"--{opt} {path}: is a directory, expected a file path")


def _check_impls(kernels: tuple[str, ...], patterns: list[str]) -> None:
    """Refuse an --impls pattern that names no implementation: it would silently run nothing."""
    from fnmatch import fnmatch

    from craft.bench.core import impls
    from craft.cli.errors import fail

    names = [i.name for k in kernels for i in impls(k)]
    unmatched = [p for p in patterns if not any(fnmatch(n, p) for n in names)]
    if unmatched:
        known = ", ".join(dict.fromkeys(names))
        fail(f"--impls {unmatched[0]!r}: matches no implementation (known: {known})")


def _run(kernels: tuple[str, ...], a: dict[str, Any], train: dict[str, Any] | None) -> None:
    """Run kernel families (and the training benchmark), print tables, write JSON and plot."""
    _check_outputs(a)
    train_cfg = _train_config(train) if train is not None else None  # config errors first
    settings = _settings(a) if kernels else None
    if settings is None:
        _imports(a.get("imports"))
        if a.get("threads"):
            import torch

            torch.set_num_threads(a["threads"])

    import torch
    from rich.console import Console

    from craft.bench import family, machine_info, run_family
    from craft.bench.core import dtype_name
    from craft.bench.hardware import peak_for
    from craft.bench.progress import Progress
    from craft.bench.report import document, print_report, write_json, write_plot
    from craft.cli.errors import fail

    if settings is not None and settings.impls:
        _check_impls(kernels, settings.impls)
    # Wide enough for the tables when the output goes to a file or a pipe.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 132)
    device = settings.device if settings else torch.device("cpu")
    machine = machine_info(device)
    _header(console, machine, settings)
    peak = peak_for(machine["device_name"]) if device.type == "cuda" else None
    reports = []
    with Progress() as progress:
        for name in kernels:
            fam = family(name)
            reports.append(run_family(fam, settings, on_progress=progress.update))
            progress.done(fam.title)
    for report in reports:
        print_report(console, report, peak.bandwidth if peak else None)

    train_record = None
    if train is not None:
        train_record = _train(console, train, train_cfg)

    command = "craft bench " + " ".join(shlex.quote(x) for x in sys.argv[2:])
    if a.get("json"):
        doc = document(
            machine,
            settings.to_json() if settings else {},
            reports,
            train_record,
            command,
            a.get("note"),
        )
        try:
            write_json(Path(a["json"]), doc)
        except OSError as e:
            fail(f"--json {a['json']}: cannot write it ({e.strerror or e})")
        console.print(f"wrote {a['json']}")
    if a.get("plot"):
        if reports:
            sub = f"{machine['device_name']} · {dtype_name(settings.dtype)} · {settings.mode}"
            try:
                write_plot(Path(a["plot"]), reports, sub)
            except OSError as e:
                fail(f"--plot {a['plot']}: cannot write it ({e.strerror or e})")
            console.print(f"wrote {a['plot']}")
        else:
            console.print("[yellow]--plot: nothing to plot (no kernel benchmark ran)[/yellow]")
    bad = [r for rep in reports for r in rep.results if r.status in ("wrong", "failed")]
    if bad:
        names = sorted({f"{r.family}/{r.impl}" for r in bad})
        sys.stderr.write(f"{len(bad)} result(s) wrong or failed, never timed: {', '.join(names)}\n")
        raise SystemExit(1)


def _header(console: Any, machine: dict[str, Any], settings: Any) -> None:
    versions = f"torch {machine['torch']}, triton {machine['triton'] or 'not installed'}"
    console.print(f"[bold]craft bench[/bold] on {machine['device_name']} ({versions})")
    for module, why in machine.get("craft_backends_not_loaded", {}).items():
        console.print(f"[yellow]Craft backend module {module} not loaded:[/yellow] {why}")
    if settings is not None and settings.device.type != "cuda":
        console.print(
            "[yellow]No CUDA device: benchmarking the CPU paths. GPU-only implementations "
            "(Triton, CUDA kernels, SDPA flash/efficient/cudnn on GPU, Liger-Kernel) are skipped "
            "and listed below each table.[/yellow]"
        )


def _train_config(t: dict[str, Any]) -> Any:
    """The validated training config (before torch is imported: a bad recipe fails fast)."""
    from craft.bench.config import load_bench_config

    return load_bench_config(t["recipe"], t["overrides"], quick=t["quick"])


def _train(console: Any, t: dict[str, Any], cfg: Any) -> dict[str, Any]:
    from craft.bench.report import fmt_bytes
    from craft.bench.train import run_train_bench

    quick = t["quick"]
    steps = t["steps"] if t["steps"] is not None else (3 if quick else 20)
    warmup = t["warmup"] if t["warmup"] is not None else (1 if quick else 3)
    recipe = t["recipe"]
    label = str(recipe) if recipe else "built-in (4 x 128 GPT on random tokens)"
    if quick and not recipe:
        label = "built-in quick (2 x 32 GPT on random tokens)"
    console.print(f"[bold]training[/bold] {label}: {warmup} warm-up + {steps} timed steps")
    rec = run_train_bench(cfg, steps=steps, warmup=warmup, label=label)
    rec["overrides"] = list(t["overrides"])
    mfu = f"{100 * rec['mfu']:.1f}%" if rec.get("mfu") is not None else f"n/a ({rec['mfu_note']})"
    console.print(
        f"  {rec['tokens_per_s']:,.0f} tokens/s | {rec['ms_per_step']:.1f} ms/step (median) | "
        f"MFU {mfu} | peak memory {fmt_bytes(rec['peak_mem_bytes'])} "
        f"({rec['mem_method']}) | {rec['params']:,} params on {rec['device_name']}"
    )
    return rec


def _kernel_command(kernels: tuple[str, ...], help_text: str) -> Any:
    def command(
        device: str = DEVICE,
        dtype: str = DTYPE,
        mode: str = MODE,
        causal: bool = CAUSAL,
        batch: str | None = BATCH,
        heads: str | None = HEADS,
        kv_heads: str | None = KV_HEADS,
        seq_lens: str | None = SEQ_LENS,
        head_dim: str | None = HEAD_DIM,
        vocab: str | None = VOCAB,
        hidden: str | None = HIDDEN,
        norm_kind: str | None = NORM_KIND,
        residual: bool = RESIDUAL,
        impls: str | None = IMPLS,
        compile: bool | None = COMPILE,
        threads: int | None = THREADS,
        seed: int = SEED,
        json: Path | None = JSON_OUT,
        plot: Path | None = PLOT_OUT,
        quick: bool = QUICK,
        imports: list[str] | None = IMPORTS,
        note: str | None = NOTE,
    ) -> None:
        from craft.cli.errors import run_guarded

        args = dict(locals())
        run_guarded(lambda: _run(kernels, args, None))

    command.__doc__ = help_text
    return command


def register(app: typer.Typer) -> None:
    bench = typer.Typer(
        help="Kernel and training benchmarks; every result is checked against float64 first.",
        no_args_is_help=True,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    helps = {
        "attention": "Attention: SDPA backends, Craft's backends, eager, torch.compile.",
        "cross-entropy": "Cross-entropy over (tokens, vocab) logits.",
        "linear-cross-entropy": "Output layer + cross-entropy, fused or with full logits.",
        "norm": "LayerNorm / RMSNorm, optionally with a fused residual add.",
    }
    for name in KERNELS:
        bench.command(name)(_kernel_command((name,), helps[name]))

    @bench.command("train")
    def train(
        recipe: Path = typer.Argument(..., help="Recipe TOML file.", show_default=False),
        overrides: list[str] | None = typer.Argument(
            None,
            help="Overrides: section.key=value (data.type=random needs no dataset).",
            show_default=False,
        ),
        steps: int | None = STEPS,
        warmup: int | None = WARMUP,
        threads: int | None = THREADS,
        json: Path | None = JSON_OUT,
        quick: bool = QUICK,
        imports: list[str] | None = IMPORTS,
        note: str | None = NOTE,
    ) -> None:
        """Training throughput of a recipe: tokens/s, ms/step, MFU (CUDA), peak memory."""
        from craft.cli.errors import run_guarded

        t = {
            "recipe": recipe,
            "overrides": overrides or [],
            "steps": steps,
            "warmup": warmup,
            "quick": quick,
        }
        a = {"json": json, "plot": None, "threads": threads, "imports": imports, "note": note}
        run_guarded(lambda: _run((), a, t))

    @bench.command("all")
    def all_(
        device: str = DEVICE,
        dtype: str = DTYPE,
        mode: str = MODE,
        causal: bool = CAUSAL,
        batch: str | None = BATCH,
        heads: str | None = HEADS,
        kv_heads: str | None = KV_HEADS,
        seq_lens: str | None = SEQ_LENS,
        head_dim: str | None = HEAD_DIM,
        vocab: str | None = VOCAB,
        hidden: str | None = HIDDEN,
        norm_kind: str | None = NORM_KIND,
        residual: bool = RESIDUAL,
        impls: str | None = IMPLS,
        compile: bool | None = COMPILE,
        threads: int | None = THREADS,
        seed: int = SEED,
        json: Path | None = JSON_OUT,
        plot: Path | None = PLOT_OUT,
        quick: bool = QUICK,
        imports: list[str] | None = IMPORTS,
        recipe: Path | None = typer.Option(
            None, "--recipe", help="Recipe for the training benchmark (default: a small GPT)."
        ),
        steps: int | None = STEPS,
        warmup: int | None = WARMUP,
        note: str | None = NOTE,
    ) -> None:
        """Every kernel benchmark, then the training benchmark."""
        from craft.cli.errors import run_guarded

        a = dict(locals())
        t = {
            "recipe": recipe,
            "overrides": ["data.type=random"] if recipe else [],
            "steps": steps,
            "warmup": warmup,
            "quick": quick,
        }
        run_guarded(lambda: _run(KERNELS, a, t))

    app.add_typer(bench, name="bench")
