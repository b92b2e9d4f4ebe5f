"""The Trainer: builds a run from a validated config and wires its parts together.

Order of events in one step: `train_step` (micro-batches -> gradient clipping, the norm is
measured here -> non-finite check, before anything changes -> optimizer and scheduler step) ->
`on_step_end` -> log -> eval -> checkpoint -> stop if asked (signal, early stopping).

Each part is found by its name: the step in `craft.training.step`, validation in
`craft.training.validation`, the run directory and resume choice in `craft.training.rundir`, the
checkpoint's contents in `craft.training.checkpointer` (its files: `craft.training.checkpoint`),
the progress counters in `craft.training.state`, the Accelerator and the decisions processes share
in `craft.training.runtime`, and what callbacks see in `craft.training.callbacks`.

This is the one module of `craft.training` over ~400 lines, on purpose: `_setup` is the start-up
order in one place (ownership of the run directory before anything is written, data before the
model, the model before a new run directory, the distributed setup checked before the first
step), and each of its lines is a call into one of the parts above. Split further, that order
would have to be read across files.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from craft.config import registry
from craft.errors import ConfigError
from craft.training import checkpoint as ckpt
from craft.training.builders import build_data, build_start_model, describe_model
from craft.training.callbacks import Callback, RunContext, build_callbacks
from craft.training.checkpointer import Checkpointer
from craft.training.logs import ThroughputWindow, describe_run, setup_logging
from craft.training.precision import apply_auto_precision
from craft.training.pretrained import resolve_pretrained
from craft.training.rng import seed_everything
from craft.training.rundir import (
    check_resume,
    create_run_dir,
    new_run_dir,
    open_run_dir,
    own_run_dir,
    remove_made_dirs,
    resolve_resume,
)
from craft.training.runtime import (
    decided_on_main,
    describe_distributed,
    fsdp_requested,
    is_fsdp,
    is_sharded,
    make_accelerator,
    runs_plain,
    set_determinism,
)
from craft.training.signals import StopSignals, any_process
from craft.training.state import TrainState
from craft.training.step import StepOutput, TrainStep
from craft.training.validation import Validation, eval_shard

_new_run_dir = new_run_dir  # its name when it lived here
__all__ = ["TrainResult", "Trainer", "eval_shard"]

log = logging.getLogger("craft.training")


@dataclass
class TrainResult:
    """What a finished (or stopped) run left behind."""

    run_dir: Path
    step: int
    status: str  # completed | stopped
    last_checkpoint: Path | None
    best_val_loss: float | None
    last_val_loss: float | None
    export_dir: Path | None


def _on_state(name: str) -> Any:
    """A Trainer attribute that is `self.state.<name>`."""
    return property(
        lambda self: getattr(self.state, name),
        lambda self, value: setattr(self.state, name, value),
        doc=f"`state.{name}`",
    )


class Trainer:
    """Builds model, data, optimizer and callbacks from `cfg`, optionally resumes, then `fit()`s.

    `resume`: None (new run), "auto" (the newest complete checkpoint of the newest run with one
    under `<output_dir>/<run.name>/`, or a new run when there is none) or a path to a run or
    checkpoint directory. `callbacks` are added to the built-in and configured ones.
    The main process owns the run directory (a lock another process is refused) from here until
    `fit()` returns or `close()` is called.
    """

    step = _on_state("step")
    tokens_seen = _on_state("tokens_seen")
    best_val_loss = _on_state("best_val_loss")
    last_val_loss = _on_state("last_val_loss")
    last_checkpoint = _on_state("last_checkpoint")
    _evaluated_step = _on_state("evaluated_step")

    def __init__(
        self, cfg: Any, *, resume: str | None = None, callbacks: list[Callback] | None = None
    ) -> None:
        self.cfg = cfg = resolve_pretrained(cfg)  # model.init_from fills the model section
        self.run_name = cfg.run.name
        self.max_steps = cfg.training.max_steps
        self.state = TrainState()
        self.start_step = 0
        self._stop_reason: str | None = None
        self._signals = StopSignals()
        self._teardown_logging: Any = None
        self._log_file: Any = None
        self._export_dir: Path | None = None
        self._deterministic_before = torch.are_deterministic_algorithms_enabled()
        self._closed = False
        self._made_dirs: list[Path] = []  # a new run's directory and the parents made for it
        self._owned = contextlib.ExitStack()  # the run directory's lock (main process)
        try:
            self._setup(resume, callbacks or [])
        except BaseException:
            self.close()
            remove_made_dirs(self._made_dirs)  # a run that failed to start leaves nothing
            raise
        self._made_dirs = []

    # ------------------------------------------------------------------------------- setup

    def _setup(self, resume: str | None, extra_callbacks: list[Callback]) -> None:
        cfg, auto = apply_auto_precision(self.cfg)  # the run's config.toml records the choice
        self.cfg = cfg
        set_determinism(cfg.run.deterministic)
        acc = self.accelerator = make_accelerator(cfg)
        self.rank, self.world_size = acc.process_index, acc.num_processes
        self.is_main, self.device = acc.is_main_process, acc.device
        # train.log keeps what is logged from here on; a new run's directory is only created once
        # its data and model are built, so a run that fails before leaves no directory behind.
        self.console, _, self._teardown_logging, log_file = setup_logging(
            None, is_main=self.is_main, rank=self.rank, mode=cfg.logging.progress
        )
        self._log_file = log_file  # train.log (main process): a failed write stops the run
        if auto is not None:
            log.info("precision auto: %s (%s)", auto.label, auto.reason)
        agreed = {"is_main": self.is_main, "world_size": self.world_size}
        # The run directory continued in is owned from here: a second process on it is refused
        # before anything is written (config.toml, train.log, metrics, checkpoints).
        run_dir, resume_from = decided_on_main(
            lambda: resolve_resume(cfg, resume, self._owned), **agreed
        )

        # Same initial weights on every process; per-process streams are re-seeded below.
        seed_everything(cfg.run.seed)
        self.data = build_data(
            cfg,
            rank=self.rank,
            world_size=self.world_size,
            is_main=self.is_main,
            wait=acc.wait_for_everyone,
        )
        self.tokenizer = self.data.tokenizer
        from craft import ops

        model = self.raw_model = build_start_model(
            cfg,
            self.data.vocab_size,
            self.tokenizer,
            fused_loss=cfg.kernels.fused_loss,
            pretrained=resume_from is None,  # model.init_from: the weights of a new run
            kernels=cfg.kernels,
        )
        table = getattr(model, "kernels", None)
        plan = (table if isinstance(table, ops.Kernels) else ops.DEFAULT).plan(self.device.type)
        ops.log_plan(plan, self.device.type)  # `auto` resolves per input signature on first use
        log.info("model: %s", describe_model(cfg, model, self.data.vocab_size))
        saved: dict[str, Any] | None = None
        if resume_from is not None:
            saved = check_resume(resume_from, cfg, model, own_run=resume == "auto")
            ckpt.load_weights_into(model, resume_from / "model.safetensors")

        if run_dir is None:

            def create() -> tuple[Path, list[Path]]:
                path, made = create_run_dir(cfg)
                self._made_dirs = made
                own_run_dir(path, self._owned)
                return path, made

            run_dir, _ = decided_on_main(create, **agreed)
        self.run_dir = run_dir
        if self.is_main:
            assert log_file is not None
            open_run_dir(self.run_dir, cfg, log_file)
        log.info("run directory: %s", self.run_dir)

        model.to(self.device)
        optimizer = registry.build("optimizer", cfg.optimizer, model)
        self.scheduler = registry.build("scheduler", cfg.scheduler, optimizer, self.max_steps)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        # What was obtained, not what was asked for: Accelerate may set up less than requested.
        self._fsdp = is_fsdp(acc) or is_sharded(self.model)
        if fsdp_requested() and not self._fsdp:
            raise ConfigError(
                "FSDP was requested (ACCELERATE_USE_FSDP) but the model was not sharded "
                f"({describe_distributed(acc, self.model)}); Craft does not fall back silently"
            )
        log.info("distributed: %s", describe_distributed(acc, self.model))
        direct = runs_plain(acc)
        self.train_step = TrainStep(
            self.model, self.optimizer, self.scheduler, acc, cfg.training, direct=direct
        )

        seed_everything(cfg.run.seed + self.rank)
        self.train_iter = self.data.train_batches(cfg.training.batch_size, cfg.run.seed)
        self.validation = Validation(cfg, self.data, acc)
        t = cfg.training
        block = getattr(cfg.model, "block_size", 0)
        self.tokens_per_step = t.batch_size * t.grad_accum_steps * self.world_size * block

        self.callbacks = build_callbacks(cfg, extra_callbacks)
        self.checkpointer = Checkpointer(
            cfg=cfg,
            run_dir=self.run_dir,
            state=self.state,
            # FSDP state dicts are read through the wrapper (without torch.compile's)
            module=getattr(self.model, "_orig_mod", self.model) if self._fsdp else model,
            optimizer=self.train_step.raw_optimizer,
            scheduler=self.scheduler,
            train_iter=lambda: self.train_iter,
            callbacks=self.callbacks,
            tokenizer=self.tokenizer,
            accelerator=acc,
        )
        if resume_from is not None and saved is not None:
            self.checkpointer.restore(resume_from, saved)
        self.start_step = self.step
        self.context = RunContext(
            cfg=cfg,
            run_dir=self.run_dir,
            model=model,
            tokenizer=self.tokenizer,
            device=self.device,
            rank=self.rank,
            is_main=self.is_main,
            start_step=self.start_step,
            can_sample=self.can_sample,
            console=self.console,
            request_stop=self.request_stop,
            state=self.state,
        )
        log.info("training: %s", describe_run(cfg, self.step, self.world_size, self.device))

    # ------------------------------------------------------------------------------- API

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        """The plain model (no DDP / compile wrapper), e.g. for sampling."""
        return self.raw_model

    @property
    def can_sample(self) -> bool:
        """Sampling on one process needs unsharded weights (not FSDP)."""
        return not self._fsdp

    def request_stop(self, reason: str) -> None:
        """End the run after the current step (with a checkpoint). Every process must call it."""
        if self._stop_reason is None:
            self._stop_reason = reason

    def _call(self, hook: str, *args: Any) -> None:
        for _, cb in self.callbacks:
            if cb.main_process_only and not self.is_main:
                continue
            getattr(cb, hook)(self.context, *args)

    def fit(self) -> TrainResult:
        """Train to `max_steps` (or until stopped); returns where things were left."""
        status = "failed"
        self._signals.install()
        try:
            self._call("on_train_start")
            if self.step >= self.max_steps:
                log.info("already at step %d of %d; nothing to train", self.step, self.max_steps)
            signal_stop = self._loop()
            status = "stopped" if (signal_stop or self._stop_reason) else "completed"
            self._finish(status, interrupted=bool(signal_stop))
            return TrainResult(
                run_dir=self.run_dir,
                step=self.step,
                status=status,
                last_checkpoint=self.last_checkpoint,
                best_val_loss=self.best_val_loss,
                last_val_loss=self.last_val_loss,
                export_dir=self._export_dir,
            )
        finally:
            self._signals.restore()
            try:
                self._end_callbacks(status)
            finally:
                self.close()

    def _end_callbacks(self, status: str) -> None:
        """`on_train_end`; after a failure, one that fails too (a full disk fails the loss curve
        as well) is logged and the run's own error is the one reported."""
        if status != "failed":
            self._call("on_train_end", status)
            return
        try:
            self._call("on_train_end", status)
        except Exception as e:
            log.warning("on_train_end failed too, after an error: %s: %s", type(e).__name__, e)

    def close(self) -> None:
        """Release logging handlers and global switches (safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        self._owned.close()  # the run directory is free for the next process
        if self._teardown_logging is not None:
            self._teardown_logging()
        torch.use_deterministic_algorithms(self._deterministic_before)
        # Let a later Trainer in this process choose another precision; the process group and
        # device (PartialState) stay.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)

    # ------------------------------------------------------------------------------- loop

    def _loop(self) -> str | None:
        cfg, state = self.cfg, self.state
        self.model.train()
        t_start, elapsed_before = time.perf_counter(), state.elapsed_s
        window = ThroughputWindow()
        signal_stop: str | None = None

        def elapsed() -> float:
            return elapsed_before + time.perf_counter() - t_start

        while state.step < self.max_steps:
            out = self.train_step(self.train_iter, stop=self._signals.received is not None)
            if not out.finite:
                raise out.error(state.step + 1, newest=self.last_checkpoint)
            state.step += 1
            state.tokens_seen += self.tokens_per_step
            window.steps += 1
            metrics = {
                "step": state.step,
                "loss": out.loss,
                "lr": out.lr,
                "grad_norm": out.grad_norm,
                "tokens": state.tokens_seen,
            }
            self._call("on_step_end", metrics)

            if out.stop and signal_stop is None:
                signal_stop = self._signals.received or "a signal on another process"
                log.warning(
                    "received %s: finished step %d, writing a checkpoint and exiting "
                    "(Ctrl-C again aborts at once)",
                    signal_stop,
                    state.step,
                )
            last = state.step == self.max_steps or signal_stop is not None or self._stop_reason
            first = state.step == self.start_step + 1
            if state.step % cfg.training.log_interval == 0 or last or first:
                self._log(out, window, elapsed())
                window = ThroughputWindow()

            with window.pause():
                evaluated = state.step % cfg.eval.interval == 0
                if evaluated:
                    self.evaluate()
                stopping = signal_stop is not None or self._stop_reason is not None
                saved = state.step % cfg.checkpoint.interval == 0 or stopping
                if saved:
                    self.save_checkpoint(elapsed=elapsed())
                multi = self.world_size > 1
                # A signal during the evaluation or the checkpoint: stop now, not a step later.
                late = (evaluated or saved) and not stopping
                if late and any_process(self._signals.received, self.device, multi):
                    signal_stop = self._signals.received or "a signal on another process"
                    log.warning("received %s at step %d; exiting", signal_stop, state.step)
                    if state.saved_step != state.step:
                        self.save_checkpoint(elapsed=elapsed())
                    stopping = True
            if self._log_file is not None:
                self._log_file.check()  # e.g. a full disk: stop now, one line, exit 2
            if stopping:
                if self._stop_reason:
                    log.info("%s; stopping at step %d", self._stop_reason, state.step)
                break
        state.elapsed_s = elapsed()
        return signal_stop

    def _log(self, out: StepOutput, window: ThroughputWindow, elapsed_s: float) -> None:
        """`on_log` with the step's loss averaged over processes."""
        loss = out.loss
        if self.world_size > 1:
            t = torch.tensor([loss], device=self.device)
            loss = float(self.accelerator.reduce(t, reduction="mean").item())
        busy = window.busy_s()
        self._call(
            "on_log",
            {
                "step": self.step,
                "loss": loss,
                "lr": out.lr,
                "grad_norm": out.grad_norm,
                "tokens": self.tokens_seen,
                "tokens_per_s": window.steps * self.tokens_per_step / busy,
                "ms_per_step": 1000.0 * busy / window.steps,
                "elapsed_s": elapsed_s,
            },
        )

    def _finish(self, status: str, *, interrupted: bool) -> None:
        cfg = self.cfg
        if status == "completed":
            if cfg.eval.at_end and self._evaluated_step != self.step and self.step > 0:
                self.evaluate()
            if cfg.checkpoint.save_at_end and self.state.saved_step != self.step:
                self.save_checkpoint()
        if cfg.checkpoint.export and not interrupted and self.step > 0:
            self._export_dir = self.checkpointer.export()
        log.info(
            "%s at step %d%s%s",
            "finished" if status == "completed" else "stopped",
            self.step,
            f" | val loss {self.last_val_loss:.4f}" if self.last_val_loss is not None else "",
            f" | checkpoint {self.last_checkpoint}" if self.last_checkpoint else "",
        )

    # ------------------------------------------------------------------------------- eval

    def evaluate(self) -> float | None:
        """Mean validation loss over the fixed eval batches, averaged over all processes."""
        if len(self.validation) == 0:
            log.warning("eval: the validation split yields no batches; skipping evaluation")
            return None
        t0 = time.perf_counter()
        val = self.validation.loss(self.model)
        self.state.record_eval(val)
        log.info(
            "eval step %d: val loss %.4f (best %.4f)", self.step, val, self.best_val_loss or val
        )
        self._call(
            "on_eval",
            {
                "step": self.step,
                "val_loss": val,
                "best_val_loss": self.best_val_loss,
                "eval_s": time.perf_counter() - t0,
            },
        )
        return val

    # ------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, *, elapsed: float | None = None) -> Path | None:
        """Write a checkpoint of the current step (collective: every process calls it).

        `elapsed`: seconds trained so far, to record (default: the last recorded value).
        """
        if elapsed is not None:
            self.state.elapsed_s = elapsed
        path = self.checkpointer.save()
        if path is not None:  # the main process
            self._call("on_checkpoint", path)
        return path
