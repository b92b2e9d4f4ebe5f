"""Time to a target validation loss: Craft's recipe against nanoGPT's plain loop, same data, same run.

    python bench/time_to_target.py [--recipe recipes/char_small.toml] [--target 1.886]
        [--eval-every 50] [--repeats 3] [--plain-max-steps 3000] [--out bench/results]

The target defaults to the validation loss nanoGPT reports for its CPU character model after 2000
steps (1.886 on tinyshakespeare). Two variants, each in a fresh process, alternating `--repeats`
times so that a change in machine load hits both alike:

- craft: `craft train RECIPE` as a user runs it (`craft.training.run.train`: Accelerate, the
  recipe's model, schedule, checkpoints and samples), with evaluation every `--eval-every` steps;
  `--set` overrides the recipe;
- plain: nanoGPT's `train.py` loop (`bench/plain_loop.py`) at nanoGPT's published CPU setting
  (`plain_loop.NANOGPT_CPU`: its own block, 4 x 4 x 128, block 64, batch 12, lr 1e-3 with warmup
  100 and cosine to 1e-4 at lr_decay_iters 2000, beta2 0.99, weight decay 0.1, clip 1.0), on the
  recipe's data, whatever the recipe's own settings are (`--plain-set` overrides them). It runs up
  to `--plain-max-steps` iterations: past step 2000 nanoGPT's get_lr holds min_lr, and so does
  this loop, as nanoGPT's train.py does when max_iters exceeds lr_decay_iters.

Both evaluate the same fixed validation windows with the same function
(`craft.training.validation.validation_loss`, the recipe's `eval.windows`), every `--eval-every`
steps, and stop at the first evaluation at or below the target. Time to target = start-up (from
launching the process to the first step: interpreter, imports, data, model) + training time up to
that step; evaluation time is excluded on both sides (how often one looks is not part of training),
checkpoints and samples the recipe writes are included. Reported: median (min–max) over the
repeats; the ratio is craft's median over plain's; when the plain loop does not get there within
its cap, its time spent is a lower bound of its time to target and the ratio an upper bound.
Writes time_to_target.json, .md and .png. About 15 minutes on a quiet 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from train_throughput import run_child  # noqa: E402

NANOGPT_LOSS = 1.886  # nanoGPT's README: its CPU character model, val loss after 2000 steps
NANOGPT_STEPS = 2000  # its max_iters and lr_decay_iters
PLAIN_MAX_STEPS = 3000  # the plain loop's cap: it continues at min_lr after step 2000


# ------------------------------------------------------------------------------------ children


def _quiet(every: int, out_dir: str) -> list[str]:
    return [
        f"eval.interval={every}",
        f"run.output_dir={out_dir}",
        "logging.progress=none",
        "logging.plot=false",
    ]


def run_craft(
    recipe: str,
    overrides: list[str],
    target: float,
    eval_every: int,
    spawned: float,
    stop_at_target: bool = True,
) -> dict[str, Any]:
    """`craft train RECIPE` with `overrides`: its validation curve, and when it reached `target`."""
    from craft.bench.timing import now
    from craft.config import load_config
    from craft.training.callbacks import Callback
    from craft.training.run import train

    class Recorder(Callback):
        """Training time at every evaluation (evaluation itself excluded); stops at the target."""

        def __init__(self) -> None:
            self.t0 = 0.0
            self.startup = 0.0
            self.eval_s = 0.0
            self.step_end: dict[int, float] = {}
            self.curve: list[tuple[int, float, float]] = []
            self.reached: int | None = None

        def on_train_start(self, run: Any) -> None:
            self.startup = time.time() - spawned
            self.t0 = now(run.device)

        def on_step_end(self, run: Any, metrics: dict[str, Any]) -> None:
            self.step_end[metrics["step"]] = now(run.device) - self.t0 - self.eval_s

        def on_eval(self, run: Any, metrics: dict[str, Any]) -> None:
            self.eval_s += metrics["eval_s"]
            step, val = metrics["step"], metrics["val_loss"]
            self.curve.append((step, val, self.step_end[step]))
            if self.reached is None and val <= target:
                self.reached = step
                if stop_at_target:
                    run.request_stop(f"validation loss {val:.4f} <= target {target}")

    with tempfile.TemporaryDirectory(prefix="craft-ttt-") as tmp:
        cfg = load_config(recipe, [*overrides, *_quiet(eval_every, tmp)])
        rec = Recorder()
        train(cfg, callbacks=[rec])
    return _record(rec.startup, rec.curve, rec.reached)


def run_plain(
    recipe: str, overrides: list[str], target: float, eval_every: int, spawned: float, cap: int
) -> dict[str, Any]:
    """nanoGPT's loop at nanoGPT's CPU setting on the recipe's data, up to `cap` iterations."""
    from plain_loop import NANOGPT_CPU, PlainLoop

    from craft.bench.timing import now
    from craft.config import load_config
    from craft.training.validation import eval_windows

    with tempfile.TemporaryDirectory(prefix="craft-ttt-") as tmp:
        cfg = load_config(recipe, [*NANOGPT_CPU, *overrides, *_quiet(eval_every, tmp)])
        loop = PlainLoop(cfg)
        windows = eval_windows(cfg)
        startup = time.time() - spawned
        t0, eval_s = now(loop.device), 0.0
        curve: list[tuple[int, float, float]] = []
        reached = None
        # nanoGPT's loop runs to max_iters; past lr_decay_iters (training.max_steps) get_lr
        # returns min_lr, which PlainLoop.lr does too.
        for it in range(cap):
            loop.step(it)
            step = it + 1
            if step % eval_every == 0 or step == cap:
                t_train = now(loop.device) - t0 - eval_s
                e0 = now(loop.device)
                val = loop.val_loss(windows)
                loop.model.train()
                eval_s += now(loop.device) - e0
                curve.append((step, val, t_train))
                if val <= target:
                    reached = step
                    break
    return _record(startup, curve, reached)


def _record(
    startup: float, curve: list[tuple[int, float, float]], reached: int | None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "startup_s": startup,
        "curve": [{"step": s, "val_loss": v, "train_s": t} for s, v, t in curve],
        "reached_step": reached,
    }
    if reached is not None:
        train_s = next(t for s, _, t in curve if s == reached)
        out["train_s"] = train_s
        out["time_to_target_s"] = startup + train_s
        out["ms_per_step"] = 1e3 * train_s / reached
    elif curve:  # not reached: how far it got, and in how long (a lower bound of its time)
        step, val, train_s = curve[-1]
        out.update(last_step=step, last_val_loss=val, time_spent_s=startup + train_s)
    return out


def _child(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--variant",
        variant,
        "--spawned",
        repr(time.time()),
        "--recipe",
        args.recipe,
        "--target",
        str(args.target),
        "--eval-every",
        str(args.eval_every),
        "--plain-max-steps",
        str(args.plain_max_steps),
        *[f"--set={o}" for o in args.set],
        *[f"--plain-set={o}" for o in args.plain_set],
        *(["--threads", str(args.threads)] if args.threads else []),
    ]
    return run_child(cmd, variant)


# ------------------------------------------------------------------------------------ report


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    from craft.bench.timing import spread

    done = [r for r in runs if r["reached_step"] is not None]
    out: dict[str, Any] = {"runs": runs, "reached": f"{len(done)}/{len(runs)}"}
    for key in ("time_to_target_s", "startup_s", "train_s", "reached_step", "ms_per_step"):
        vals = [r[key] for r in done]
        out[key] = spread(vals) if vals else None
    missed = [r for r in runs if r["reached_step"] is None and "time_spent_s" in r]
    if missed:
        out["missed"] = {
            "last_step": spread([r["last_step"] for r in missed]),
            "last_val_loss": spread([r["last_val_loss"] for r in missed]),
            "time_spent_s": spread([r["time_spent_s"] for r in missed]),
        }
    return out


def settings(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """What each side trains with, as resolved from its configuration."""
    from plain_loop import NANOGPT_CPU

    from craft.config import load_config

    def describe(cfg: Any, decay_at: str) -> dict[str, str]:
        m, o, s, t = cfg.model, cfg.optimizer, cfg.scheduler, cfg.training
        return {
            "block": f"{m.positions} positions, {m.norm}, {m.mlp} MLP",
            "size": f"{m.n_layer} x {m.n_head} x {m.d_model}, block {m.block_size}, batch "
            f"{t.batch_size}",
            "lr": f"{o.lr:g}, warmup {s.warmup_steps}, {s.type} to "
            f"{getattr(s, 'min_lr', 0.0):g} {decay_at}",
            "optimizer": f"{o.type}, betas {tuple(o.betas)}, weight decay {o.weight_decay:g}, "
            f"clip {t.grad_clip:g}",
        }

    craft = load_config(args.recipe, args.set)
    plain = load_config(args.recipe, [*NANOGPT_CPU, *args.plain_set])
    return {
        "craft": describe(craft, f"at step {craft.training.max_steps} (the recipe's end)"),
        "plain": describe(
            plain,
            f"at step {plain.training.max_steps}, then held (run up to {args.plain_max_steps})",
        ),
    }


def markdown(doc: dict[str, Any]) -> str:
    from craft.bench.report import conditions
    from craft.bench.timing import fmt_spread, spread

    def cell(s: dict[str, Any] | None, fmt: str) -> str:
        return "not reached" if s is None else fmt_spread(s, fmt)

    lines = [
        f"# Time to validation loss {doc['target']}: {doc['recipe']}",
        "",
        *conditions(doc["machine"], doc.get("load_avg_end")),
        f"- command: `{doc['command']}`",
        "",
        "craft: the recipe as `craft train` runs it; plain: nanoGPT's train.py loop at nanoGPT's "
        "published CPU setting on the same data, allowed to run past its 2000 iterations (up to "
        f"{doc['plain_max_steps']}) at its final learning rate, as nanoGPT's get_lr does past "
        "lr_decay_iters. Both evaluate the same validation windows every "
        f"{doc['eval_every']} steps; evaluation time is excluded, start-up (process launch to the "
        "first step) included. Median (min–max) over "
        f"{doc['repeats']} alternating fresh-process runs per variant.",
        "",
        "| setting | craft | plain |",
        "|---|---|---|",
        *[
            f"| {k} | {doc['settings']['craft'][k]} | {doc['settings']['plain'][k]} |"
            for k in doc["settings"]["craft"]
        ],
        "",
        "| variant | reached | step at target | start-up s | training s | ms/step | time to target s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("craft", "plain"):
        s = doc["variants"][name]
        lines.append(
            f"| {name} | {s['reached']} | {cell(s['reached_step'], '.0f')} "
            f"| {cell(s['startup_s'], '.1f')} | {cell(s['train_s'], '.1f')} "
            f"| {cell(s['ms_per_step'], '.1f')} | {cell(s['time_to_target_s'], '.1f')} |"
        )
    lines.append("")
    at_2000 = [
        p["val_loss"]
        for r in doc["variants"]["plain"]["runs"]
        for p in r["curve"]
        if p["step"] == NANOGPT_STEPS
    ]
    if at_2000:
        lines += [
            f"At step {NANOGPT_STEPS}, the end of nanoGPT's published run, the plain loop's "
            f"validation loss is {fmt_spread(spread(at_2000), '.4f')}.",
            "",
        ]
    ratio = doc.get("craft_over_plain")
    if ratio is not None:
        lines.append(
            f"Craft's time to target / the plain loop's (medians): **{ratio:.2f}** "
            f"(expected <= {doc['expected_ratio']}: {'yes' if ratio <= doc['expected_ratio'] else 'NO'})."
        )
    elif doc.get("craft_over_plain_at_most") is not None:
        m = doc["variants"]["plain"]["missed"]
        lines.append(
            f"The plain loop did not reach {doc['target']} in {m['last_step']['median']:.0f} "
            f"steps (validation loss {fmt_spread(m['last_val_loss'], '.4f')} after "
            f"{fmt_spread(m['time_spent_s'], '.1f')} s), so its time to target is longer than "
            "that: Craft's time to target / the plain loop's is **at most "
            f"{doc['craft_over_plain_at_most']:.2f}** (expected <= {doc['expected_ratio']})."
        )
    else:
        lines.append("No ratio: a variant did not reach the target in every run.")
    lines += ["", f"![validation loss against time]({doc['plot']})", ""]
    return "\n".join(lines)


def target_arguments(p: argparse.ArgumentParser) -> None:
    """The options every time-to-target script shares (this one and schedule_sweep.py)."""
    p.add_argument("--recipe", default="recipes/char_small.toml")
    p.add_argument("--target", type=float, default=NANOGPT_LOSS)
    p.add_argument("--eval-every", type=int, default=50)


def target_doc(benchmark: str, args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    """The head of a time-to-target results document: what ran, on what, towards what."""
    return {
        "benchmark": benchmark,
        "command": shlex.join(["python", f"bench/{benchmark}.py", *(argv or sys.argv[1:])]),
        "recipe": args.recipe,
        "target": args.target,
        "eval_every": args.eval_every,
    }


def loss_figure(
    path: Path,
    lines: list[tuple[list[float], list[float], dict[str, Any]]],
    *,
    target: float,
    xlabel: str,
    title: str,
    headroom: float = 1.0,
    legend_size: float | None = None,
) -> None:
    """Validation-loss curves (xs, ys, matplotlib style) under the target line, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from craft.bench.report import write_figure

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for xs, ys, style in lines:
        ax.plot(xs, ys, **style)
    ax.axhline(target, color="gray", ls="--", lw=1, label=f"target {target}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss")
    ax.set_ylim(top=min(ax.get_ylim()[1], target + headroom))  # the start's loss is off-scale
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    write_figure(path, fig)


def plot(doc: dict[str, Any], path: Path) -> None:
    colors = {"craft": "tab:blue", "plain": "tab:orange"}
    lines = []
    for name, s in doc["variants"].items():
        for i, r in enumerate(s["runs"]):
            xs = [r["startup_s"] + p["train_s"] for p in r["curve"]]
            ys = [p["val_loss"] for p in r["curve"]]
            style = {"marker": "o", "ms": 2, "lw": 1, "color": colors[name], "alpha": 0.8}
            lines.append((xs, ys, {**style, "label": name if i == 0 else None}))
    loss_figure(
        path,
        lines,
        target=doc["target"],
        xlabel="seconds since launch (evaluation excluded)",
        title=f"{doc['recipe']}: time to validation loss {doc['target']}",
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target_arguments(p)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", action="append", default=[], help="Override of Craft's recipe.")
    p.add_argument(
        "--plain-set",
        action="append",
        default=[],
        help="Override of the plain loop's settings (nanoGPT's CPU setting by default).",
    )
    p.add_argument(
        "--plain-max-steps",
        type=int,
        default=PLAIN_MAX_STEPS,
        help="nanoGPT's max_iters for the plain loop (its lr_decay_iters stays 2000).",
    )
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--expected-ratio", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=None, help="torch threads in both variants.")
    p.add_argument("--variant", choices=["craft", "plain"], help=argparse.SUPPRESS)
    p.add_argument("--spawned", type=float, help=argparse.SUPPRESS)
    p.add_argument("--full", action="store_true", help=argparse.SUPPRESS)  # craft: run to the end
    args = p.parse_args(argv)
    if args.variant:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        spawned = args.spawned or time.time()
        if args.variant == "craft":
            res = run_craft(
                args.recipe, args.set, args.target, args.eval_every, spawned, not args.full
            )
        else:
            res = run_plain(
                args.recipe,
                args.plain_set,
                args.target,
                args.eval_every,
                spawned,
                args.plain_max_steps,
            )
        print(json.dumps(res))
        return

    import torch

    from craft.bench.hardware import load_avg, machine_info
    from craft.bench.report import write_results

    machine = machine_info(torch.device("cpu"))
    runs: dict[str, list[dict[str, Any]]] = {"craft": [], "plain": []}
    for i in range(args.repeats):
        for variant in ("plain", "craft") if i % 2 else ("craft", "plain"):
            r = _child(variant, args)
            runs[variant].append(r)
            got = (
                f"step {r['reached_step']}, {r['time_to_target_s']:.1f} s "
                f"(start-up {r['startup_s']:.1f} s)"
                if r["reached_step"]
                else "not reached"
            )
            print(f"{variant}: {got}", flush=True)
    variants = {name: _summary(rs) for name, rs in runs.items()}
    ratio = None
    if all(v["reached"].split("/")[0] == v["reached"].split("/")[1] for v in variants.values()):
        ratio = (
            variants["craft"]["time_to_target_s"]["median"]
            / variants["plain"]["time_to_target_s"]["median"]
        )
    bound = None
    plain = variants["plain"]
    craft_t = variants["craft"]["time_to_target_s"]
    # No plain run reached it: its times spent are lower bounds of its time to target.
    if ratio is None and craft_t and "missed" in plain and plain["time_to_target_s"] is None:
        bound = craft_t["median"] / plain["missed"]["time_spent_s"]["median"]
    out = Path(args.out)
    doc: dict[str, Any] = {
        **target_doc("time_to_target", args, argv),
        "repeats": args.repeats,
        "overrides": args.set,
        "plain_overrides": args.plain_set,
        "plain_max_steps": args.plain_max_steps,
        "settings": settings(args),
        "machine": machine,
        "load_avg_end": load_avg(),
        "variants": variants,
        "craft_over_plain": ratio,
        "craft_over_plain_at_most": bound,
        "expected_ratio": args.expected_ratio,
        "plot": "time_to_target.png",
    }
    plot(doc, out / "time_to_target.png")
    paths = write_results(out, "time_to_target", doc, markdown(doc))
    print(markdown(doc))
    print(f"wrote {paths[0]}, {paths[1]} and {out / 'time_to_target.png'}")


if __name__ == "__main__":
    main()
