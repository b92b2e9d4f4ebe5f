"""The measurement behind `training.precision = "auto"`: training step time, fp32 vs bf16 autocast,
over a sweep of model widths, on this machine.

    python bench/precision_auto.py [--widths 64,128,256,384,512,768] [--repeats 3] [--steps 5]
        [--recipe recipes/char_small.toml] [--threads N] [--out bench/results]

Each point is `craft bench train` (the Trainer's own step: Accelerate autocast, AdamW, clipping)
on the recipe with `data.type=random`, `model.d_model` set to the width (heads of 64, so
`n_head = width / 64`, at least 1) and `training.precision` = `no` (fp32) or `bf16`. The two
precisions alternate `--repeats` times per width, so that a change in machine load hits both
alike; a run's figure is its median step, and the table gives the median (min–max) over the runs.

The result states the CPU's native-bf16 features (AMX-BF16, AVX512-BF16) and the narrowest width
from which bf16 is faster at every wider width ("bf16 pays from"): on a CPU with native bf16 that
is the rule's `CPU_BF16_MIN_WIDTH` (`craft/training/precision.py`); on a CPU without it, bf16 is
emulated through fp32 conversions and the expected answer is "never". Writes precision_auto.json,
.md and .png.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from craft.bench.config import load_bench_config  # noqa: E402
from craft.bench.hardware import load_avg, machine_info  # noqa: E402
from craft.bench.report import conditions, write_figure, write_results  # noqa: E402
from craft.bench.timing import fmt_spread, spread  # noqa: E402
from craft.bench.train import run_train_bench  # noqa: E402
from craft.training.precision import CPU_BF16_MIN_WIDTH  # noqa: E402

PRECISIONS = ("no", "bf16")  # fp32, bf16 autocast


def step_ms(recipe: str, width: int, precision: str, steps: int, warmup: int) -> float:
    """The median step (ms) of one `craft bench train` run at this width and precision."""
    overrides = [
        "data.type=random",
        f"model.d_model={width}",
        f"model.n_head={max(1, width // 64)}",
        f"training.precision={precision}",
        "run.cpu=true",
    ]
    cfg = load_bench_config(recipe, overrides)
    rec = run_train_bench(cfg, steps=steps, warmup=warmup, label=recipe)
    return float(rec["ms_per_step"])


def pays_from(rows: list[dict[str, Any]]) -> int | None:
    """The narrowest width from which bf16's median step is faster at every wider width."""
    found = None
    for r in sorted(rows, key=lambda r: r["width"], reverse=True):
        if r["bf16_over_fp32"] < 1.0:
            found = r["width"]
        else:
            break
    return found


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    native = ", ".join(m.get("cpu_bf16") or []) or "none (no AMX-BF16 / AVX512-BF16)"
    lines = [
        f"# Precision auto: training step time, fp32 vs bf16 autocast ({doc['recipe']})",
        "",
        *conditions(m, doc.get("load_avg_end")),
        f"- CPU: torch capability {m.get('cpu_capability')}, native bf16: {native}",
        f"- command: `{doc['command']}`",
        "",
        f"`craft bench train` on random tokens at each width (n_head = width / 64), "
        f"{doc['steps']} timed steps after {doc['warmup']} warm-up steps per run; median "
        f"(min–max) over {doc['repeats']} alternating runs of each precision. bf16 / fp32 < 1: "
        "bf16 is faster.",
        "",
        "| width | block params | fp32 ms/step | bf16 ms/step | bf16 / fp32 |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in doc["rows"]:
        lines.append(
            f"| {r['width']} | {r['params'] / 1e6:.2f}M | {fmt_spread(r['fp32_ms'], '.1f')} | "
            f"{fmt_spread(r['bf16_ms'], '.1f')} | {r['bf16_over_fp32']:.2f} |"
        )
    p = doc["bf16_pays_from_width"]
    lines += [
        "",
        "bf16 pays from width: "
        + (f"**{p}**" if p is not None else "**never** in this sweep")
        + f". The rule in `craft/training/precision.py`: fp32 on a CPU without native bf16; on "
        f"one with it, bf16 from width {CPU_BF16_MIN_WIDTH}.",
        "",
        f"![step time against width]({doc['plot']})",
        "",
    ]
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    xs = [r["width"] for r in rows]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("fp32_ms", "fp32"), ("bf16_ms", "bf16 autocast")):
        med = [r[key]["median"] for r in rows]
        lo = [r[key]["median"] - r[key]["min"] for r in rows]
        hi = [r[key]["max"] - r[key]["median"] for r in rows]
        ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("model width (d_model)")
    ax.set_ylabel("ms per training step (median, min–max)")
    ax.legend()
    ax.grid(alpha=0.3)
    ax2.plot(xs, [r["bf16_over_fp32"] for r in rows], marker="o", color="tab:red")
    ax2.axhline(1.0, color="gray", ls="--", lw=1)
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(xs, [str(x) for x in xs])
    ax2.set_xlabel("model width (d_model)")
    ax2.set_ylabel("bf16 / fp32 step time (< 1: bf16 faster)")
    ax2.grid(alpha=0.3)
    native = ", ".join(doc["machine"].get("cpu_bf16") or []) or "no native bf16"
    fig.suptitle(f"{doc['machine'].get('device_name')} ({native})", fontsize=10)
    write_figure(path, fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/char_small.toml")
    p.add_argument("--widths", default="64,128,256,384,512,768")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info(torch.device("cpu"))
    widths = [int(w) for w in args.widths.split(",")]
    rows = []
    for width in widths:
        times: dict[str, list[float]] = {k: [] for k in PRECISIONS}
        for i in range(args.repeats):
            for prec in PRECISIONS if i % 2 == 0 else PRECISIONS[::-1]:
                times[prec].append(step_ms(args.recipe, width, prec, args.steps, args.warmup))
        fp32, bf16 = spread(times["no"]), spread(times["bf16"])
        cfg = load_bench_config(args.recipe, ["data.type=random", f"model.d_model={width}"])
        d, n = width, cfg.model.n_layer
        params = 12 * n * d * d  # blocks (attention 4d², MLP 8d²), embeddings left out
        row = {
            "width": width,
            "params": params,
            "fp32_ms": fp32,
            "bf16_ms": bf16,
            "bf16_over_fp32": bf16["median"] / fp32["median"],
        }
        rows.append(row)
        print(
            f"width {width}: fp32 {fp32['median']:.1f} ms, bf16 {bf16['median']:.1f} ms, "
            f"bf16/fp32 {row['bf16_over_fp32']:.2f}",
            flush=True,
        )
    out = Path(args.out)
    doc = {
        "benchmark": "precision_auto",
        "command": shlex.join(["python", "bench/precision_auto.py", *(argv or sys.argv[1:])]),
        "recipe": args.recipe,
        "machine": machine,
        "load_avg_end": load_avg(),
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "rows": rows,
        "bf16_pays_from_width": pays_from(rows),
        "rule_cpu_bf16_min_width": CPU_BF16_MIN_WIDTH,
        "plot": "precision_auto.png",
    }
    plot(doc, out / "precision_auto.png")
    paths = write_results(out, "precision_auto", doc, markdown(doc))
    print(markdown(doc))
    print(f"wrote {paths[0]}, {paths[1]} and {out / 'precision_auto.png'}")


if __name__ == "__main__":
    main()
