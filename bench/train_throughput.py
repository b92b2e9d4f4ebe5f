"""Training throughput of a recipe: Craft's Trainer vs a plain PyTorch loop of the same model.

    python bench/train_throughput.py [--recipe recipes/char_small.toml] [--steps 100]
        [--repeats 5] [--full] [--set key=value ...] [--out bench/results]

Each variant runs in its own fresh process (so peak memory is that variant's own) and the two
alternate `--repeats` times, so that a change in machine load hits both alike. A run's figure is
the median of its timed steps (after WARMUP); the table gives the median (min–max) of those over
the runs, and the ratio is the one the medians give. Both use the same model (built from the
recipe through the registry), batch, optimizer settings, schedule and gradient clipping; the plain
loop (`bench/plain_loop.py`) is nanoGPT's train.py loop sampling batches from the same prepared
train.bin. The Craft variant is `craft bench train` (`craft.bench.train.run_train_bench`): the
Trainer's own loop with everything it does per step (non-finite check, metrics, callbacks) but no
evaluation or checkpoints. Both are timed with the same clock (`craft.bench.timing.now`), and MFU
comes from the same formula and peak table (`craft.bench.train.mfu`, `craft.bench.hardware`).

`--set` overrides apply to both variants (e.g. nanoGPT's own block: `--set
model.positions=learned --set model.norm=layernorm --set model.mlp=gelu`; results then go to
train_throughput_custom.*). `--full` also trains the whole recipe once with
`craft.training.run.train` and records the validation loss at the last step and the wall time
from the call to its return. Results: `<out>/train_throughput[_custom].json/.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
WARMUP = 10


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_craft(recipe: str, steps: int, overrides: list[str]) -> dict[str, Any]:
    """`craft bench train` of the recipe: `steps` timed Trainer steps after WARMUP."""
    from craft.bench.config import load_bench_config
    from craft.bench.train import run_train_bench

    cfg = load_bench_config(recipe, overrides)
    rec = run_train_bench(cfg, steps=steps, warmup=WARMUP, label=recipe)
    out = {k: rec[k] for k in ("mfu",) if rec.get(k) is not None}
    ms = rec["ms_per_step"]  # the median step
    return {
        "ms_per_step": ms,
        "tokens_per_s": rec["tokens_per_step"] / ms * 1000.0,
        **out,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }


def run_plain(recipe: str, steps: int, overrides: list[str]) -> dict[str, Any]:
    """The baseline: nanoGPT's plain PyTorch loop over the same model and data."""
    import statistics

    from plain_loop import PlainLoop

    from craft.bench.timing import now
    from craft.bench.train import mfu
    from craft.config import load_config

    cfg = load_config(recipe, overrides)
    loop = PlainLoop(cfg)
    step_s = []
    t_last = now(loop.device)
    for it in range(WARMUP + steps):
        loop.step(it)
        t = now(loop.device)
        step_s.append(t - t_last)
        t_last = t
    ms = 1000.0 * statistics.median(step_s[WARMUP:])
    tokens = loop.batch_size * loop.block
    tps = tokens / ms * 1000.0
    out: dict[str, Any] = {"ms_per_step": ms, "tokens_per_s": tps}
    if (m := mfu(loop.model, loop.block, tps, loop.device).get("mfu")) is not None:
        out["mfu"] = m
    return {**out, "peak_rss_mb": round(_peak_rss_mb(), 1)}


def run_full(recipe: str, overrides: list[str], out_dir: str) -> dict[str, Any]:
    """Train the recipe once as a user would; validation loss at the end and wall time."""
    import torch

    from craft.bench.timing import now
    from craft.config import load_config
    from craft.training.run import train

    cfg = load_config(recipe, [*overrides, f"run.output_dir={out_dir}", "logging.progress=plain"])
    t0 = now(torch.device("cpu"))
    res = train(cfg)
    wall = now(torch.device("cpu")) - t0
    return {
        "steps": res.step,
        "val_loss": res.last_val_loss,
        "wall_s": wall,
        "run_dir": str(res.run_dir),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }


def _child(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--variant",
        variant,
        "--recipe",
        args.recipe,
        "--steps",
        str(args.steps),
        *[f"--set={o}" for o in args.set],
        *(["--threads", str(args.threads)] if args.threads else []),
    ]
    return run_child(cmd, variant)


def run_child(cmd: list[str], label: str) -> dict[str, Any]:
    """Run one variant in a fresh process; its result is the JSON on its last line of output."""
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        raise SystemExit(f"{label} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _machine() -> dict[str, Any]:
    import torch

    from craft.bench.hardware import machine_info

    return machine_info(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def _markdown(doc: dict[str, Any]) -> str:
    from craft.bench.report import conditions
    from craft.bench.timing import fmt_spread

    t = doc["throughput"]
    machine = doc["machine"]
    head = (
        conditions(machine, doc.get("load_avg_end"))
        if "device_name" in machine
        else [f"- machine: {machine}"]
    )
    lines = [
        f"# Training throughput: {doc['recipe']}",
        "",
        *head,
        "",
        f"{doc['note']}",
        "",
        *([f"Overrides: `{' '.join(doc['overrides'])}`.", ""] if doc.get("overrides") else []),
        f"Median (min–max) over {doc['repeats']} alternating fresh-process runs per variant; "
        f"each run's figure is the {doc.get('run_figure', 'median')} of {doc['steps']} timed "
        f"steps after {WARMUP} warm-up steps. `plain` is nanoGPT's train.py loop over the same "
        "model, data, optimizer settings, schedule and clipping.",
        "",
        "| variant | ms/step | tokens/s | peak RSS (MB) |",
        "|---|---:|---:|---:|",
    ]
    for name in ("craft", "plain"):
        r = t[name]
        lines.append(
            f"| {name} | {fmt_spread(r['ms_per_step'], '.1f')} | "
            f"{fmt_spread(r['tokens_per_s'], '.0f')} | {r['peak_rss_mb']:.0f} |"
        )
    lines.append("")
    lines.append(f"Craft / plain tokens/s (ratio of the medians): **{t['craft_over_plain']:.3f}**")
    if "mfu" in t["craft"]["runs"][0]:
        mfus = {n: t[n]["mfu"]["median"] for n in ("craft", "plain")}
        lines.append(
            f"MFU (bf16 peak, medians): craft {mfus['craft']:.1%}, plain {mfus['plain']:.1%}"
        )
    if doc.get("full"):
        f = doc["full"]
        lines += [
            "",
            "## Full run",
            "",
            f"One run of {f['steps']} steps: validation loss at step {f['steps']} "
            f"**{f['val_loss']:.4f}**, wall time **{f['wall_s'] / 60:.1f} min** "
            f"({f['wall_s']:.0f} s from the call to its return: data, model, evaluation, "
            f"checkpoints, samples and the plot included; not the interpreter's start-up), peak "
            f"RSS {f['peak_rss_mb']:.0f} MB.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(REPO / "recipes" / "char_small.toml"))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--set", action="append", default=[], help="Config override key=value.")
    p.add_argument("--full", action="store_true", help="Also train the whole recipe once.")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--note", default="", help="Conditions worth recording (e.g. machine load).")
    p.add_argument("--variant", choices=["craft", "plain", "machine"], help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None, help="torch threads in every run.")
    p.add_argument("--render", help="Only rewrite the .md next to this results JSON.")
    args = p.parse_args()
    if args.render:
        from craft.bench.report import write_file

        src = Path(args.render)
        write_file(src.with_suffix(".md"), _markdown(json.loads(src.read_text())))
        return

    if args.variant:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        if args.variant == "machine":
            print(json.dumps(_machine()))
            return
        fn = run_craft if args.variant == "craft" else run_plain
        print(json.dumps(fn(args.recipe, args.steps, args.set)))
        return

    # In a child: torch imported here would count in the peak RSS every later child inherits.
    machine = _child("machine", args)
    runs: dict[str, list[dict[str, Any]]] = {"craft": [], "plain": []}
    for i in range(args.repeats):
        for variant in ("plain", "craft") if i % 2 else ("craft", "plain"):
            r = _child(variant, args)
            runs[variant].append(r)
            print(f"{variant}: {r['ms_per_step']:.1f} ms/step, {r['tokens_per_s']:.0f} tokens/s")
    from craft.bench.timing import spread

    summary: dict[str, Any] = {
        name: {
            "ms_per_step": spread([r["ms_per_step"] for r in rs]),
            "tokens_per_s": spread([r["tokens_per_s"] for r in rs]),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "runs": rs,
            **({"mfu": spread([r["mfu"] for r in rs])} if "mfu" in rs[0] else {}),
        }
        for name, rs in runs.items()
    }
    summary["craft_over_plain"] = (
        summary["plain"]["ms_per_step"]["median"] / summary["craft"]["ms_per_step"]["median"]
    )
    doc: dict[str, Any] = {
        "benchmark": "train_throughput",
        "recipe": os.path.relpath(args.recipe, REPO),
        "machine": machine,
        "steps": args.steps,
        "repeats": args.repeats,
        "overrides": args.set,
        "note": args.note
        or "The two variants alternate in the same run, so their ratio is the comparable figure.",
        "throughput": summary,
    }
    if args.full:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            doc["full"] = run_full(args.recipe, args.set, tmp)
            doc["full"]["run_dir"] = "(temporary)"
        print(f"full run: val loss {doc['full']['val_loss']:.4f}, {doc['full']['wall_s']:.0f}s")
    from craft.bench.hardware import load_avg
    from craft.bench.report import write_results

    doc["load_avg_end"] = load_avg()
    out = Path(args.out)
    stem = "train_throughput" if not args.set else "train_throughput_custom"
    write_results(out, stem, doc, _markdown(doc))
    print(_markdown(doc))
    print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
    main()
