"""The built-in callbacks: progress display, metrics.jsonl, trackers, early stopping, loss curve.

Each has a builder `build_<name>(config) -> Callback | None` (None: the config turns it off),
registered under its name by `craft.training.callbacks`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from craft.fileio import atomic_write_bytes, atomic_write_text, storage_error
from craft.progress import Progress
from craft.training.callbacks import Callback, RunContext
from craft.training.logs import resolve_progress_mode

log = logging.getLogger("craft.training")
step_log = logging.getLogger("craft.training.steps")


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _fmt_rate(tokens_per_s: float) -> str:
    if tokens_per_s >= 1e6:
        return f"{tokens_per_s / 1e6:.2f}M"
    if tokens_per_s >= 1e3:
        return f"{tokens_per_s / 1e3:.1f}k"
    return f"{tokens_per_s:.0f}"


# ----------------------------------------------------------------------------- progress


class ProgressCallback(Callback):
    """A rich progress bar on a terminal (step, loss, lr, tokens/s, ETA), else plain log lines.

    The step lines always go to `train.log`; on the console they appear only in plain mode.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self._bar: Progress | None = None

    def on_train_start(self, run: RunContext) -> None:
        if resolve_progress_mode(self.mode, run.console) != "rich":  # "auto": a terminal?
            return
        self._bar = Progress(
            "train",
            run.max_steps,
            unit="steps",
            completed=run.start_step,
            fields=("loss", "lr", "tok/s"),
            mode="rich",
            console=run.console,
        ).start()

    def on_step_end(self, run: RunContext, metrics: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.update(completed=metrics["step"])

    def on_log(self, run: RunContext, metrics: dict[str, Any]) -> None:
        remaining = (run.max_steps - metrics["step"]) * metrics["ms_per_step"] / 1000.0
        step_log.info(
            "step %d/%d | loss %.4f | lr %.3e | grad norm %.3f | %s tok/s | %.1f ms/step | ETA %s",
            metrics["step"],
            run.max_steps,
            metrics["loss"],
            metrics["lr"],
            metrics["grad_norm"],
            _fmt_rate(metrics["tokens_per_s"]),
            metrics["ms_per_step"],
            _fmt_duration(remaining),
        )
        if self._bar is not None:
            rate = _fmt_rate(metrics["tokens_per_s"])
            self._bar.update(
                loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", **{"tok/s": rate}
            )

    def on_train_end(self, run: RunContext, status: str) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def build_progress(cfg: Any) -> Callback | None:
    return ProgressCallback(cfg.logging.progress)


# ----------------------------------------------------------------------------- metrics file


class MetricsFileCallback(Callback):
    """`metrics.jsonl`: one JSON object per logged step and per evaluation.

    On resume, records past the resumed step (written after that checkpoint by the interrupted
    run) are dropped first, so the file never holds a step twice.
    """

    FILENAME = "metrics.jsonl"

    def __init__(self) -> None:
        self._file: Any = None
        self._failed = False

    def on_train_start(self, run: RunContext) -> None:
        path = run.run_dir / self.FILENAME
        if path.exists():
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= run.start_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115  (closed in on_train_end)

    def _write(self, record: dict[str, Any]) -> None:
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:  # a full disk: one line, exit 2 (a torn last line is skipped on read)
            self._failed = True
            err = storage_error(e, f"writing {self._file.name}", name_file=False)
            if err is None:
                raise
            raise err from None

    def on_log(self, run: RunContext, metrics: dict[str, Any]) -> None:
        self._write({"split": "train", "time": time.time(), **metrics})

    def on_eval(self, run: RunContext, metrics: dict[str, Any]) -> None:
        self._write({"split": "val", "time": time.time(), **metrics})

    def on_train_end(self, run: RunContext, status: str) -> None:
        if self._file is not None:
            # After a failed write the buffer still holds the record: closing fails again.
            with contextlib.suppress(OSError) if self._failed else contextlib.nullcontext():
                self._file.close()
            self._file = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (a torn last line from a crash is skipped)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def build_metrics_file(cfg: Any) -> Callback | None:
    return MetricsFileCallback()


# ----------------------------------------------------------------------------- trackers


class TrackersCallback(Callback):
    """TensorBoard / W&B through Accelerate's tracker classes; a missing package is skipped."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.trackers: list[Any] = []

    def on_train_start(self, run: RunContext) -> None:
        from accelerate import tracking
        from accelerate.utils import is_tensorboard_available, is_wandb_available

        from craft.training.checkpoint import config_dict

        available = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
        for name in self.names:
            if not available.get(name, False):
                log.warning("logging.trackers: %s is not installed; not logging to it", name)
                continue
            if name == "tensorboard":
                tracker = tracking.TensorBoardTracker(run.run_name, run.run_dir / "tb")
            else:
                tracker = tracking.WandBTracker(run.run_name, dir=str(run.run_dir))
            tracker.start()
            flat = _flatten_scalars(config_dict(run.cfg))
            tracker.store_init_configuration(flat)
            self.trackers.append(tracker)

    def _log(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def on_log(self, run: RunContext, metrics: dict[str, Any]) -> None:
        keys = ("loss", "lr", "grad_norm", "tokens_per_s", "ms_per_step")
        self._log({f"train/{k}": float(metrics[k]) for k in keys}, metrics["step"])

    def on_eval(self, run: RunContext, metrics: dict[str, Any]) -> None:
        self._log({"val/loss": float(metrics["val_loss"])}, metrics["step"])

    def on_train_end(self, run: RunContext, status: str) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def _flatten_scalars(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten_scalars(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def build_trackers(cfg: Any) -> Callback | None:
    return TrackersCallback(list(cfg.logging.trackers)) if cfg.logging.trackers else None


# ----------------------------------------------------------------------------- early stopping


class EarlyStoppingCallback(Callback):
    """Stops the run (with a checkpoint) after `patience` evaluations without a new best loss."""

    main_process_only = False  # every process must stop at the same step

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.best = math.inf
        self.bad_evals = 0

    def on_eval(self, run: RunContext, metrics: dict[str, Any]) -> None:
        loss = metrics["val_loss"]
        if loss < self.best - self.min_delta:
            self.best = loss
            self.bad_evals = 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            run.request_stop(
                f"early stopping: no validation improvement over {self.best:.4f} in "
                f"{self.bad_evals} evaluations"
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best if math.isfinite(self.best) else None,
            "bad_evals": self.bad_evals,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = math.inf if state.get("best") is None else float(state["best"])
        self.bad_evals = int(state.get("bad_evals", 0))


def build_early_stopping(cfg: Any) -> Callback | None:
    patience = cfg.training.early_stopping_patience
    return EarlyStoppingCallback(patience) if patience else None


# ----------------------------------------------------------------------------- loss curve


def plot_loss_curve(metrics_path: Path, out: Path, title: str) -> Path | None:
    """Train and validation loss against step as a PNG (None when there is nothing to plot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path) if metrics_path.exists() else []
    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("split") == "val"]
    if not train and not val:
        return None
    fig = Figure(figsize=(8, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        ax.plot(*zip(*train, strict=True), label="train", color="tab:blue", alpha=0.8, lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation", color="tab:orange", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(out, buf.getvalue())
    return out


class LossCurveCallback(Callback):
    """`loss_curve.png` in the run directory at the end, from the whole metrics.jsonl."""

    FILENAME = "loss_curve.png"

    def on_train_end(self, run: RunContext, status: str) -> None:
        try:
            path = plot_loss_curve(
                run.run_dir / MetricsFileCallback.FILENAME,
                run.run_dir / self.FILENAME,
                f"{run.run_name}: loss",
            )
        except ImportError as e:  # matplotlib is a dependency: only a broken install gets here
            log.warning(
                "logging.plot: no loss curve written: matplotlib cannot be imported (%s)", e
            )
            return
        if path is not None:
            log.info("loss curve: %s", path)


def build_loss_curve(cfg: Any) -> Callback | None:
    return LossCurveCallback() if cfg.logging.plot else None
