"""Compare two training runs of the GPU check: loss curves and tokens/s of kernels A vs kernels B.

    python bench/gpu_check_train.py RUN_A RUN_B --labels triton+cuda,torch --out DIR

RUN_A / RUN_B are run directories (with metrics.jsonl). Writes DIR/train.json, DIR/train.md and
DIR/train_loss.png. "Same curve within noise" is judged by one stated rule: the largest gap
between the two runs' train losses smoothed over `--window` logged steps must not exceed the
step-to-step batch noise of run B (the std of its loss around its own smoothed curve over the
second half of training), and every validation loss must differ by less than that noise too.
tokens/s: median (min–max) over the logged steps after the first `--skip` (warm-up, autotuning).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from craft.bench.report import conditions, write_figure, write_results  # noqa: E402
from craft.bench.timing import fmt_spread, spread  # noqa: E402


def _records(run_dir: Path) -> tuple[dict[int, dict[str, Any]], dict[int, float]]:
    train: dict[int, dict[str, Any]] = {}
    val: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("split") == "train":
            train[rec["step"]] = rec
        elif rec.get("split") == "val":
            val[rec["step"]] = rec["val_loss"]
    return train, val


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def compare(a: Path, b: Path, labels: tuple[str, str], window: int, skip: int) -> dict[str, Any]:
    (ta, va), (tb, vb) = _records(a), _records(b)
    steps = sorted(set(ta) & set(tb))
    if len(steps) < 2:
        raise ValueError(f"the runs share {len(steps)} logged steps; nothing to compare")
    la = [ta[s]["loss"] for s in steps]
    lb = [tb[s]["loss"] for s in steps]
    sa, sb = _smooth(la, window), _smooth(lb, window)
    half = len(steps) // 2
    noise = statistics.pstdev([x - m for x, m in zip(lb[half:], sb[half:], strict=True)])
    gap = max(abs(x - y) for x, y in zip(sa, sb, strict=True))
    val_steps = sorted(set(va) & set(vb))
    val_gap = max((abs(va[s] - vb[s]) for s in val_steps), default=None)

    def tps(t: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
        vals = [t[s]["tokens_per_s"] for s in steps[skip:] if "tokens_per_s" in t[s]]
        return spread(vals) if vals else None

    spread_a, spread_b = tps(ta), tps(tb)
    tps_a = spread_a["median"] if spread_a else None
    tps_b = spread_b["median"] if spread_b else None
    within = gap <= noise and (val_gap is None or val_gap <= noise)
    return {
        "labels": list(labels),
        "runs": [str(a), str(b)],
        "steps": steps[-1],
        "logged_steps": len(steps),
        "final_train_loss_smoothed": [sa[-1], sb[-1]],
        "val_losses": {str(s): [va[s], vb[s]] for s in val_steps},
        "max_smoothed_train_gap": gap,
        "max_val_gap": val_gap,
        "batch_noise_std": noise,
        "window": window,
        "same_curve_within_noise": within,
        "tokens_per_s": [spread_a, spread_b],  # median (min-max) over the logged steps
        "tokens_per_s_ratio": (tps_a / tps_b) if tps_a and tps_b else None,
        "curves": {"steps": steps, labels[0]: la, labels[1]: lb},
    }


def markdown(r: dict[str, Any], meta: dict[str, Any]) -> str:
    a, b = r["labels"]
    lines = [f"# char_gpt training: {a} kernels vs {b} kernels", ""]
    if "device_name" in meta:  # a craft.bench.hardware.machine_info record
        lines += conditions(meta)
    else:
        lines += [f"- {k}: {v}" for k, v in meta.items()]
    ratio = r["tokens_per_s_ratio"]
    lines += [
        "",
        f"| | {a} | {b} |",
        "|---|---|---|",
        f"| steps | {r['steps']} | {r['steps']} |",
        "| final train loss (smoothed) | "
        + " | ".join(f"{x:.4f}" for x in r["final_train_loss_smoothed"])
        + " |",
    ]
    for step, (x, y) in r["val_losses"].items():
        lines.append(f"| val loss @ {step} | {x:.4f} | {y:.4f} |")
    lines.append(
        "| tokens/s, median (min–max) over logged steps | "
        + " | ".join("n/a" if t is None else fmt_spread(t, ",.0f") for t in r["tokens_per_s"])
        + " |"
    )
    gap, noise, vgap = r["max_smoothed_train_gap"], r["batch_noise_std"], r["max_val_gap"]
    lines += [
        "",
        f"- tokens/s ratio {a}/{b}: {'n/a' if ratio is None else f'{ratio:.3f}'}",
        f"- largest gap of the smoothed train losses ({r['window']} steps): {gap:.4f}; "
        f"largest val gap: {'n/a' if vgap is None else f'{vgap:.4f}'}; batch noise std of "
        f"{b}: {noise:.4f}",
        f"- same loss curve within noise (both gaps <= the noise std): "
        f"{'yes' if r['same_curve_within_noise'] else 'NO'}",
    ]
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = r["curves"]["steps"]
    for label in r["labels"]:
        ax.plot(steps, _smooth(r["curves"][label], r["window"]), label=f"{label} kernels")
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss (mean of {r['window']} logged steps)")
    ax.set_title("char_gpt, bf16")
    ax.legend()
    write_figure(path, fig, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--labels", default="A,B")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--skip", type=int, default=3)
    p.add_argument("--meta", type=Path, default=None, help="JSON of device, versions, date")
    args = p.parse_args(argv)
    labels = tuple(args.labels.split(",", 1))
    try:
        r = compare(args.run_a, args.run_b, labels, args.window, args.skip)  # type: ignore[arg-type]
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = json.loads(args.meta.read_text()) if args.meta else {}
    r["meta"] = meta
    report = markdown(r, meta)
    write_results(args.out, "train", r, report)
    plot(r, args.out / "train_loss.png")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
