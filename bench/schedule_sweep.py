"""Learning-rate schedules of a recipe, by the step at which validation loss reaches a target.

    python bench/schedule_sweep.py [--recipe recipes/char_small.toml] [--target 1.886]
        [--lr 1e-3 --lr 2e-3 ...] [--warmup 50 --warmup 100] [--full BEST_N]
        [--set key=value ...] [--out bench/results]

Each schedule (every `--lr` x `--warmup`, plus `--extra "name=k=v,k=v"`) trains the recipe with
`craft train` in a fresh process, evaluating every `--eval-every` steps, and stops at the first
evaluation at or below the target. The step at which a run gets there does not depend on machine
load (the run is seeded), so this sweep can run on a busy machine; its wall times are not results
and are not reported. `--full N` then trains the N schedules that got there first to the recipe's
last step, to check that reaching the target sooner does not cost the final validation loss.
Writes <recipe>_schedule_sweep.json, .md and .png (validation loss against step).
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from time_to_target import loss_figure, target_arguments, target_doc  # noqa: E402
from train_throughput import run_child  # noqa: E402


def _run(args: argparse.Namespace, overrides: list[str], full: bool) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(REPO / "bench" / "time_to_target.py"),
        "--variant=craft",
        f"--spawned={time.time()!r}",
        f"--recipe={args.recipe}",
        f"--target={args.target}",
        f"--eval-every={args.eval_every}",
        *[f"--set={o}" for o in [*args.set, *overrides]],
        *(["--full"] if full else []),
        *([f"--threads={args.threads}"] if args.threads else []),
    ]
    return run_child(cmd, " ".join(overrides))


def schedules(args: argparse.Namespace) -> dict[str, list[str]]:
    """Name -> overrides: the grid of peak lr x warmup, then the `--extra` ones."""
    out = {
        f"lr {lr:g}, warmup {w}": [f"optimizer.lr={lr}", f"scheduler.warmup_steps={w}"]
        for lr in args.lr
        for w in args.warmup
    }
    for spec in args.extra:
        name, _, rest = spec.partition("=")
        out[name] = [o for o in rest.split(",") if o]
    return out


def markdown(doc: dict[str, Any]) -> str:
    from craft.bench.report import conditions

    lines = [
        f"# Schedules of {doc['recipe']}: steps to validation loss {doc['target']}",
        "",
        *conditions(doc["machine"], doc.get("load_avg_end")),
        f"- command: `{doc['command']}`",
        "",
        "Each schedule trains the recipe (`craft train`, seeded) and is evaluated every "
        f"{doc['eval_every']} steps on the recipe's fixed validation windows. The step at which "
        "validation loss first reaches the target does not depend on machine load, so these "
        "step counts hold on any machine of this kind (a different thread count or CPU may move "
        "the last digits of a loss); no wall time is reported here "
        "(`bench/time_to_target.py` measures those). "
        "Final loss: the validation loss at the recipe's last step, for the schedules run that far.",
        "",
        "| schedule | overrides | step at target | final validation loss |",
        "|---|---|---:|---:|",
    ]
    for name, r in doc["schedules"].items():
        step = r["reached_step"] if r["reached_step"] is not None else "not reached"
        final = f"{r['final_val_loss']:.4f}" if r.get("final_val_loss") is not None else ""
        lines.append(f"| {name} | `{' '.join(r['overrides'])}` | {step} | {final} |")
    lines += ["", f"![validation loss against step]({doc['plot']})", ""]
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> None:
    lines = []
    for name, r in doc["schedules"].items():
        curve = r.get("full_curve") or r["curve"]
        xs, ys = [p["step"] for p in curve], [p["val_loss"] for p in curve]
        lines.append((xs, ys, {"lw": 1.2, "label": name}))
    loss_figure(
        path,
        lines,
        target=doc["target"],
        xlabel="step",
        title=f"{doc['recipe']}: validation loss by schedule",
        headroom=0.8,
        legend_size=7,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target_arguments(p)
    p.add_argument("--lr", type=float, action="append", default=[])
    p.add_argument("--warmup", type=int, action="append", default=[])
    p.add_argument("--extra", action="append", default=[], help='"name=key=value,key=value"')
    p.add_argument("--set", action="append", default=[], help="Override for every schedule.")
    p.add_argument("--full", type=int, default=1, help="Run the first N to the last step.")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run.")
    p.add_argument("--jobs", type=int, default=1, help="Runs at a time.")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)
    args.lr = args.lr or [1e-3, 1.5e-3, 2e-3, 3e-3]
    args.warmup = args.warmup or [50, 100]

    import torch

    from craft.bench.hardware import load_avg, machine_info
    from craft.bench.report import write_results

    machine = machine_info(torch.device("cpu"))
    if args.threads:
        machine["torch_threads"] = args.threads
    grid = schedules(args)
    results: dict[str, dict[str, Any]] = {}

    def first(name: str) -> None:
        r = _run(args, grid[name], full=False)
        results[name] = {"overrides": grid[name], **r}
        print(f"{name}: step {r['reached_step']}", flush=True)

    def full(name: str) -> None:
        r = _run(args, grid[name], full=True)
        results[name]["full_curve"] = r["curve"]
        results[name]["final_val_loss"] = r["curve"][-1]["val_loss"]
        print(f"{name}: final validation loss {r['curve'][-1]['val_loss']:.4f}", flush=True)

    # Step counts do not depend on load, so the children may share the machine.
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(first, grid))
        results = {name: results[name] for name in grid}  # the grid's order
        reached = [n for n, r in results.items() if r["reached_step"] is not None]
        list(pool.map(full, sorted(reached, key=lambda n: results[n]["reached_step"])[: args.full]))
    for r in results.values():  # wall times taken on a busy machine are not results
        for key in ("startup_s", "train_s", "time_to_target_s", "ms_per_step", "time_spent_s"):
            r.pop(key, None)
        for point in [*r["curve"], *r.get("full_curve", [])]:
            point.pop("train_s", None)
    stem = f"{Path(args.recipe).stem}_schedule_sweep"
    out = Path(args.out)
    doc: dict[str, Any] = {
        **target_doc("schedule_sweep", args, argv),
        "overrides": args.set,
        "machine": machine,
        "load_avg_end": load_avg(),
        "schedules": results,
        "plot": f"{stem}.png",
    }
    plot(doc, out / f"{stem}.png")
    paths = write_results(out, stem, doc, markdown(doc))
    print(markdown(doc))
    print(f"wrote {paths[0]}, {paths[1]} and {out / (stem + '.png')}")


if __name__ == "__main__":
    main()
