"""Training throughput of a recipe: Craft's Trainer vs a plain PyTorch loop of the same model.

    python bench/train_throughput.py [--recipe recipes/char_small.toml] [--steps 100]
        [--repeats 2] [--full] [--out bench/results]

Each variant runs in its own fresh process (so peak memory is that variant's own) and the two
alternate `--repeats` times; the best and the median ms/step are reported. Both use the same model
(built from the recipe through the registry), batch, optimizer settings and gradient clipping; the
plain loop samples batches nanoGPT-style from the same prepared train.bin. The Craft variant is
`craft bench train` (`craft.bench.train.run_train_bench`): the Trainer's own loop with everything
it does per step (non-finite check, metrics, callbacks) but no evaluation or checkpoints. Both
are timed with the same clock (`craft.bench.timing.now`), and MFU comes from the same formula and
peak table (`craft.bench.train.mfu`, `craft.bench.hardware`).

`--full` also trains the whole recipe once with `craft.training.run.train` and records the
validation loss at the last step and the wall time. Results: `<out>/train_throughput.json/.md`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WARMUP = 10


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_craft(recipe: str, steps: int, overrides: list[str]) -> dict[str, Any]:
    """`craft bench train` of the recipe: `steps` timed Trainer steps after WARMUP."""
    from craft.bench.config import load_bench_config
    from craft.bench.train import run_train_bench

    cfg = load_bench_config(recipe, overrides)
    rec = run_train_bench(cfg, steps=steps, warmup=WARMUP, label=recipe)
    out = {k: rec[k] for k in ("tokens_per_s", "mfu") if rec.get(k) is not None}
    return {"ms_per_step": rec["ms_per_step_mean"], **out, "peak_rss_mb": round(_peak_rss_mb(), 1)}


def run_plain(recipe: str, steps: int, overrides: list[str]) -> dict[str, Any]:
    """The baseline: a plain PyTorch loop (nanoGPT's) over the same model and data."""
    import numpy as np
    import torch

    from craft.bench.timing import now
    from craft.bench.train import mfu
    from craft.config import load_config
    from craft.data.datasets import PreparedDataset
    from craft.training.builders import build_data, build_model

    cfg = load_config(recipe, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.run.cpu else "cpu")
    torch.manual_seed(cfg.run.seed)
    dm = build_data(cfg, rank=0, world_size=1, is_main=True, wait=lambda: None)
    data = PreparedDataset(dm.dir).split("train")
    model = build_model(cfg, dm.vocab_size, kernels=cfg.kernels).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt_cfg = cfg.optimizer
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": opt_cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=opt_cfg.lr,
        betas=tuple(opt_cfg.betas),
        fused=device.type == "cuda",
    )
    B, T = cfg.training.batch_size, cfg.model.block_size
    warmup, min_lr = cfg.scheduler.warmup_steps, cfg.scheduler.min_lr
    max_steps = cfg.training.max_steps

    def get_lr(it: int) -> float:
        if it < warmup:
            return opt_cfg.lr * (it + 1) / (warmup + 1)
        ratio = min(1.0, (it - warmup) / (max_steps - warmup))
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (opt_cfg.lr - min_lr)

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(data) - T, (B,))
        x = torch.stack([torch.from_numpy(data[i : i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + T].astype(np.int64)) for i in ix])
        return x.to(device), y.to(device)

    model.train()
    stamps = []
    for it in range(WARMUP + steps):
        for g in optimizer.param_groups:
            g["lr"] = get_lr(it)
        x, y = get_batch()
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.training.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(now(device))
    ms = 1000.0 * (stamps[-1] - stamps[WARMUP - 1]) / steps
    tps = B * T / ms * 1000.0
    out = {"ms_per_step": ms, "tokens_per_s": tps}
    if (m := mfu(model, T, tps, device).get("mfu")) is not None:
        out["mfu"] = m
    return {**out, "peak_rss_mb": round(_peak_rss_mb(), 1)}


def run_full(recipe: str, overrides: list[str], out_dir: str) -> dict[str, Any]:
    """Train the recipe once as a user would; validation loss at the end and wall time."""
    from craft.config import load_config
    from craft.training.run import train

    cfg = load_config(recipe, [*overrides, f"run.output_dir={out_dir}", "logging.progress=plain"])
    t0 = time.perf_counter()
    res = train(cfg)
    wall = time.perf_counter() - t0
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
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _machine() -> dict[str, Any]:
    import torch

    from craft.bench.hardware import machine_info

    return machine_info(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def _describe(machine: dict[str, Any]) -> str:
    """One line of a machine record (from `machine_info`, or an older flat one)."""
    keys = ("device_name", "cpu_count", "torch_threads", "torch", "python", "craft", "load_avg")
    if "device_name" not in machine:
        return ", ".join(f"{k} {v}" for k, v in machine.items())
    return ", ".join(f"{k} {machine[k]}" for k in keys if machine.get(k) is not None)


def _markdown(doc: dict[str, Any]) -> str:
    t = doc["throughput"]
    lines = [
        f"# Training throughput: {doc['recipe']}",
        "",
        f"Date: {doc['date']}. Machine: " + _describe(doc["machine"]) + ".",
        "",
        f"{doc['note']}",
        "",
        *([f"Overrides: `{' '.join(doc['overrides'])}`.", ""] if doc.get("overrides") else []),
        f"Best of {doc['repeats']} alternating fresh-process runs per variant (median alongside), "
        f"{doc['steps']} timed steps after {WARMUP} warm-up steps each. `plain` is a nanoGPT-style "
        "PyTorch loop over the same model, data, optimizer settings and clipping.",
        "",
        "| variant | ms/step (best) | ms/step (median) | tokens/s (best) | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("craft", "plain"):
        r = t[name]
        lines.append(
            f"| {name} | {r['ms_per_step']:.1f} | {r['median_ms_per_step']:.1f} | "
            f"{r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    lines.append("")
    lines.append(f"Craft / plain tokens/s: {t['craft_over_plain']:.3f}")
    if "mfu" in t["craft"]["runs"][0]:
        mfus = {n: max(r["mfu"] for r in t[n]["runs"]) for n in ("craft", "plain")}
        lines.append(f"MFU (bf16 peak): craft {mfus['craft']:.1%}, plain {mfus['plain']:.1%}")
    if doc.get("full"):
        f = doc["full"]
        lines += [
            "",
            "## Full run",
            "",
            f"{f['steps']} steps, validation loss at step {f['steps']}: **{f['val_loss']:.4f}**, "
            f"wall time {f['wall_s'] / 60:.1f} min (evaluation, checkpoints and the plot "
            f"included), peak RSS {f['peak_rss_mb']:.0f} MB.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(REPO / "recipes" / "char_small.toml"))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--set", action="append", default=[], help="Config override key=value.")
    p.add_argument("--full", action="store_true", help="Also train the whole recipe once.")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--note", default="", help="Conditions worth recording (e.g. machine load).")
    p.add_argument("--variant", choices=["craft", "plain", "machine"], help=argparse.SUPPRESS)
    p.add_argument("--render", help="Only rewrite the .md next to this results JSON.")
    args = p.parse_args()
    from craft.bench.report import write_file, write_json

    if args.render:
        src = Path(args.render)
        write_file(src.with_suffix(".md"), _markdown(json.loads(src.read_text())))
        return

    if args.variant:
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
    # Contention only ever adds time, so the best run is the least noisy estimate; the median
    # is kept alongside.
    summary = {
        name: {
            "ms_per_step": min(r["ms_per_step"] for r in rs),
            "tokens_per_s": max(r["tokens_per_s"] for r in rs),
            "median_ms_per_step": statistics.median(r["ms_per_step"] for r in rs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "runs": rs,
        }
        for name, rs in runs.items()
    }
    summary["craft_over_plain"] = (
        summary["craft"]["tokens_per_s"] / summary["plain"]["tokens_per_s"]
    )
    doc: dict[str, Any] = {
        "recipe": os.path.relpath(args.recipe, REPO),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
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
    out = Path(args.out)
    stem = "train_throughput" if not args.set else "train_throughput_custom"
    write_json(out / f"{stem}.json", doc)
    write_file(out / f"{stem}.md", _markdown(doc))
    print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
    main()
