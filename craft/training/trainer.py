"""The Trainer: builds a run from a validated config and runs the loop under an Accelerator.

One optimizer step = `grad_accum_steps` micro-batches per process; each micro-batch loss (the
mean over its valid target tokens) is weighted by its share of the valid target tokens of the
whole step on all processes (`craft.training.accumulation.token_weights`) before backward, so the
accumulated gradient is the gradient of the mean over every valid token of the step, however
many tokens each micro-batch ignores. DDP syncs gradients only on the last micro-batch.

Order of events in one step: micro-batches -> gradient clipping (the norm is measured here) ->
non-finite check (before anything changes) -> optimizer and scheduler step -> `on_step_end` ->
log -> eval -> checkpoint -> stop if asked (signal, early stopping).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from craft.config import registry, to_toml
from craft.errors import CheckpointError, ConfigError, TrainingError
from craft.fileio import atomic_write_text
from craft.training import checkpoint as ckpt
from craft.training.accumulation import token_weights
from craft.training.builders import build_data, build_start_model
from craft.training.callbacks import BUILTINS, Callback, ProgressCallback
from craft.training.logs import setup_logging
from craft.training.pretrained import resolve_pretrained
from craft.training.rng import capture_rng, restore_rng, seed_everything
from craft.training.schedulers import restore_scheduler, scheduler_state
from craft.training.signals import StopSignals, any_process
from craft.training.state_io import flatten_state, unflatten_state

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


def _has_accelerator() -> bool:
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "is_available"):
        return bool(acc.is_available())
    return torch.cuda.is_available()


def _versions() -> dict[str, str]:
    import accelerate
    import safetensors

    import craft

    return {
        "craft": craft.__version__,
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def eval_shard(num_batches: int, rank: int, world_size: int) -> list[tuple[int, bool]]:
    """(batch index, counted) pairs that process `rank` evaluates: batches rank, rank + world, ...

    Every process gets the same number of entries (a sharded FSDP forward is a collective, and
    DDP may broadcast buffers in one), so a process short of a batch repeats batch 0 uncounted.
    """
    rounds = -(-num_batches // world_size)
    picks = [rank + k * world_size for k in range(rounds)]
    return [(i, True) if i < num_batches else (0, False) for i in picks]


def eval_windows(cfg: Any) -> int:
    """Validation windows per evaluation: `eval.windows`, or the deprecated `eval.batches` times
    the eval batch size (warned about: that set depends on the batch size)."""
    from craft.config.sections import DEFAULT_EVAL_WINDOWS

    if cfg.eval.batches is None:
        return cfg.eval.windows or DEFAULT_EVAL_WINDOWS
    n = cfg.eval.batches * (cfg.eval.batch_size or cfg.training.batch_size)
    logging.getLogger("craft").warning(
        "eval.batches is deprecated: it scores batches x batch size = %d windows, so the "
        "validation loss depends on the batch size; set eval.windows = %d instead",
        n,
        n,
    )
    return n


def _new_run_dir(runs_root: Path) -> Path:
    """`<runs_root>/<YYYYmmdd-HHMMSS>[-N]/`, created (never reusing an existing directory)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        runs_root.mkdir(parents=True, exist_ok=True)
        for i in range(1000):
            path = runs_root / (stamp if i == 0 else f"{stamp}-{i}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as e:  # read-only or missing location, a file in the way
        raise ConfigError(
            f"run.output_dir: cannot create a run directory under {runs_root} ({e.strerror or e})"
        ) from None
    raise ConfigError(f"run.output_dir: cannot create a new run directory under {runs_root}")


def _remove_made_dirs(made: list[Path]) -> None:
    """Remove the run directory a failed start created (it holds only that start's files), then
    the parents made for it while they are empty."""
    if not made:
        return
    shutil.rmtree(made[-1], ignore_errors=True)
    for d in reversed(made[:-1]):
        try:
            d.rmdir()
        except OSError:
            break


class Trainer:
    """Builds model, data, optimizer and callbacks from `cfg`, optionally resumes, then `fit()`s.

    `resume`: None (new run), "auto" (the newest complete checkpoint of the newest run with one
    under `<output_dir>/<run.name>/`, or a new run when there is none) or a path to a run or
    checkpoint directory. `callbacks` are added to the built-in and configured ones.
    """

    def __init__(
        self, cfg: Any, *, resume: str | None = None, callbacks: list[Callback] | None = None
    ) -> None:
        self.cfg = cfg = resolve_pretrained(cfg)  # model.init_from fills the model section
        self.run_name = cfg.run.name
        self.max_steps = cfg.training.max_steps
        self.step = 0
        self.start_step = 0
        self.tokens_seen = 0
        self.best_val_loss: float | None = None
        self.last_val_loss: float | None = None
        self.last_checkpoint: Path | None = None
        self._stop_reason: str | None = None
        self._signals = StopSignals()
        self._teardown_logging: Any = None
        self._elapsed_before = 0.0
        self._saved_step = -1
        self._evaluated_step = -1
        self._deterministic_before = torch.are_deterministic_algorithms_enabled()
        self._closed = False
        self._made_dirs: list[Path] = []  # a new run's directory and the parents made for it
        try:
            self._setup(resume, callbacks or [])
        except BaseException:
            self.close()
            _remove_made_dirs(self._made_dirs)  # a run that failed to start leaves nothing
            raise
        self._made_dirs = []

    # ------------------------------------------------------------------------------- setup

    def _setup(self, resume: str | None, extra_callbacks: list[Callback]) -> None:
        cfg = self.cfg
        if cfg.run.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        else:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.accelerator = self._make_accelerator()
        acc = self.accelerator
        self.rank = acc.process_index
        self.world_size = acc.num_processes
        self.is_main = acc.is_main_process
        self.device = acc.device
        if cfg.training.precision == "fp16" and getattr(acc, "scaler", None) is None:
            logging.getLogger("craft").warning(
                "training.precision = 'fp16' on %s runs without a loss scaler; prefer 'bf16'",
                self.device,
            )

        # train.log keeps what is logged from here on; a new run's directory is only created once
        # its data and model are built, so a run that fails before leaves no directory behind.
        self.console, mode, self._teardown_logging, log_file = setup_logging(
            None, is_main=self.is_main, rank=self.rank, mode=cfg.logging.progress
        )
        self._progress_mode = mode
        run_dir, resume_from = self._resolve_run(resume)

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

        model = build_start_model(
            cfg,
            self.data.vocab_size,
            self.tokenizer,
            fused_loss=cfg.kernels.fused_loss,
            pretrained=resume_from is None,
            kernels=cfg.kernels,
        )
        table = getattr(model, "kernels", None)
        plan = (table if isinstance(table, ops.Kernels) else ops.DEFAULT).plan(self.device.type)
        ops.log_plan(plan, self.device.type)  # `auto` resolves per input signature on first use
        self.raw_model = model
        n_params = (
            model.num_params()
            if hasattr(model, "num_params")
            else sum(p.numel() for p in model.parameters())
        )
        log.info(
            "model: %s, %s parameters, vocab %d, block %s",
            cfg.model.type,
            f"{n_params:,}",
            self.data.vocab_size,
            getattr(cfg.model, "block_size", "-"),
        )

        state: dict[str, Any] | None = None
        if resume_from is not None:
            state = self._check_resume(resume_from, model, own_run=resume == "auto")
            ckpt.load_weights_into(model, resume_from / "model.safetensors")

        self.run_dir = run_dir if run_dir is not None else self._create_run_dir()
        if self.is_main:
            assert log_file is not None
            log_file.open(self.run_dir / "train.log")
            atomic_write_text(self.run_dir / "config.toml", to_toml(cfg))
            removed = ckpt.clean_stale(self.run_dir / ckpt.CHECKPOINTS)
            for p in removed:
                log.info("removed leftover of an interrupted checkpoint write: %s", p.name)
        log.info("run directory: %s", self.run_dir)

        model.to(self.device)
        optimizer = registry.build("optimizer", cfg.optimizer, model)
        self.scheduler = registry.build("scheduler", cfg.scheduler, optimizer, self.max_steps)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self._raw_optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        self._fsdp = "FSDP" in str(acc.distributed_type)
        # Without a loss scaler, DDP or one process need nothing from Accelerate's wrappers in the
        # hot loop (they cost ~0.3 ms per step on a CPU): call backward, clipping and the
        # optimizer directly. FSDP, DeepSpeed and fp16 go through Accelerate.
        plain_types = {"NO", "MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU"}
        self._direct = (
            getattr(acc, "scaler", None) is None
            and str(acc.distributed_type).rsplit(".", 1)[-1] in plain_types
        )
        self._state_module = self._unwrap_compiled(self.model) if self._fsdp else model

        seed_everything(cfg.run.seed + self.rank)
        self.train_iter = self.data.train_batches(cfg.training.batch_size, cfg.run.seed)
        eval_bs = cfg.eval.batch_size or cfg.training.batch_size
        # Each process evaluates its share of the fixed validation windows; losses are summed.
        self._eval_batches = self.data.eval_batches("val", eval_bs, windows=eval_windows(cfg))
        self._eval_plan = eval_shard(len(self._eval_batches), self.rank, self.world_size)
        self.tokens_per_step = (
            cfg.training.batch_size
            * cfg.training.grad_accum_steps
            * self.world_size
            * getattr(cfg.model, "block_size", 0)
        )

        self.callbacks = self._build_callbacks(extra_callbacks)
        if resume_from is not None and state is not None:
            try:
                self._restore(resume_from, state)
            except (KeyError, IndexError, TypeError, ValueError) as e:
                # Files of the right size whose content is not what this version wrote.
                raise CheckpointError(
                    f"{resume_from}: malformed training state ({type(e).__name__}: {e}); "
                    "resume from another checkpoint"
                ) from e
        self.start_step = self.step
        log.info(
            "training: %d steps from step %d | %d process(es) on %s | batch %d x %d accum x %d "
            "tokens = %d tokens/step | precision %s%s",
            self.max_steps,
            self.step,
            self.world_size,
            self.device,
            cfg.training.batch_size,
            cfg.training.grad_accum_steps,
            getattr(cfg.model, "block_size", 0),
            self.tokens_per_step,
            cfg.training.precision,
            " | compiled" if cfg.training.compile else "",
        )

    def _make_accelerator(self) -> Any:
        from accelerate import Accelerator

        cfg = self.cfg
        cpu = cfg.run.cpu or not _has_accelerator()
        try:
            return Accelerator(
                cpu=cpu,
                mixed_precision=cfg.training.precision,
                dynamo_backend="inductor" if cfg.training.compile else "no",
                step_scheduler_with_optimizer=False,
            )
        except (ValueError, NotImplementedError) as e:
            raise ConfigError(
                f"training.precision = {cfg.training.precision!r}: not usable on this machine "
                f"({'cpu' if cpu else 'accelerator'}): {e}"
            ) from None

    @staticmethod
    def _unwrap_compiled(module: torch.nn.Module) -> torch.nn.Module:
        return getattr(module, "_orig_mod", module)

    def _resolve_run(self, resume: str | None) -> tuple[Path | None, Path | None]:
        """Decide (on the main process) the run directory and the checkpoint to resume from.

        The run directory is None for a new run (see `_create_run_dir`).
        """
        from accelerate.utils import broadcast_object_list

        payload: list[Any] = [None, None, None]
        if self.is_main:
            try:
                payload[:2] = self._resolve_run_main(resume)
            except CheckpointError as e:
                payload[2] = e.message
        if self.world_size > 1:
            payload = broadcast_object_list(payload)
        if payload[2] is not None:
            raise CheckpointError(payload[2])
        run_dir, found = payload[0], payload[1]
        return (Path(run_dir) if run_dir else None), (Path(found) if found else None)

    def _create_run_dir(self) -> Path:
        """A new `<output_dir>/<run.name>/<timestamp>/`, made by the main process for all."""
        from accelerate.utils import broadcast_object_list

        payload: list[Any] = [None, None]
        if self.is_main:
            runs_root = Path(self.cfg.run.output_dir) / self.cfg.run.name
            missing = [p for p in (runs_root, *runs_root.parents) if not p.exists()][::-1]
            try:
                payload[0] = str(_new_run_dir(runs_root))
                self._made_dirs = [*missing, Path(payload[0])]
            except ConfigError as e:
                payload[1] = e.message
        if self.world_size > 1:
            payload = broadcast_object_list(payload)
        if payload[1] is not None:
            raise ConfigError(payload[1])
        return Path(payload[0])

    def _resolve_run_main(self, resume: str | None) -> tuple[str | None, str | None]:
        runs_root = Path(self.cfg.run.output_dir) / self.cfg.run.name
        if resume is None:
            return None, None
        run_dir, found = ckpt.choose_resume(runs_root, resume)
        return (str(run_dir) if run_dir else None), (str(found) if found else None)

    def _check_resume(self, path: Path, model: torch.nn.Module, own_run: bool) -> dict[str, Any]:
        """Trainer state of `path` after checking that it fits the model; reports config changes.

        `own_run` (--resume auto: found under this recipe's run.output_dir) imports what the
        checkpoint's config names, as the recipe that started the run did; another path imports
        only what the recipe being run imports.
        """
        state = ckpt.read_trainer_state(path)
        saved_cfg = ckpt.read_config(
            path,
            trust_imports=own_run,
            trusted=self.cfg.imports,
            hint="add them to the recipe's imports if you trust them",
        )
        changes = ckpt.config_changes(ckpt.config_dict(saved_cfg), ckpt.config_dict(self.cfg))
        model_changes = [c for c in changes if c.startswith(("model.", "tokenizer."))]
        shapes = ckpt.weight_shapes(path / "model.safetensors")
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        mismatch = sorted(set(shapes) ^ set(expected)) or [
            k for k in expected if shapes[k] != expected[k]
        ]
        if mismatch:
            name = mismatch[0]
            what = f"{name}: checkpoint {shapes.get(name, 'absent')}, config {expected.get(name, 'absent')}"
            if not model_changes:
                raise CheckpointError(
                    f"--resume {path}: model.safetensors does not match the checkpoint's own "
                    f"config ({what}); the weights file is damaged or was replaced"
                )
            raise CheckpointError(
                f"--resume {path}: the config changes the model shape ({what}); changed: "
                f"{'; '.join(model_changes)}"
            )
        if changes:
            log.warning("resuming with config changes: %s", "; ".join(changes))
        if state.get("config_hash") != ckpt.config_hash(self.cfg) and not changes:
            log.info("config hash differs from the checkpoint's (defaults changed)")
        log.info("resuming from %s (step %d)", path, state["step"])
        return state

    def _restore(self, path: Path, state: dict[str, Any]) -> None:
        """Everything but the model weights (already loaded): optimizer, schedule, data, RNG."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        from craft.training.state_io import load_state

        try:
            osd, _ = load_state(path, "optimizer")
        except Exception as e:  # corrupt JSON or safetensors; the COMPLETE marker checks sizes only
            raise CheckpointError(f"{path}: cannot read the optimizer state: {e}") from None
        groups = self._raw_optimizer.param_groups
        saved_groups = osd["param_groups"]
        if len(saved_groups) != len(groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, groups, strict=True)
        ):
            raise CheckpointError(
                f"{path}/optimizer.json: parameter groups do not match the optimizer of this "
                f"config ({[len(s['params']) for s in saved_groups]} vs "
                f"{[len(g['params']) for g in groups]} parameters)"
            )
        # Hyperparameters (lr, betas, weight decay) come from the current config.
        osd["param_groups"] = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": s["params"]}
            for s, g in zip(saved_groups, groups, strict=True)
        ]
        try:
            set_optimizer_state_dict(
                self._state_module,
                self._raw_optimizer,
                osd,
                options=StateDictOptions(full_state_dict=True),
            )
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(
                f"{path}: optimizer state does not fit this optimizer: {e}"
            ) from None

        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.best_val_loss = state.get("best_val_loss")
        self.last_val_loss = state.get("last_val_loss")
        self._elapsed_before = float(state.get("elapsed_s", 0.0))
        self._saved_step = self.step
        self.last_checkpoint = path
        restore_scheduler(self.scheduler, state.get("scheduler", {}), self.step)

        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])

        saved_world = int(state.get("world_size", 1))
        data_states = state.get("data", [])
        tensors = ckpt.read_trainer_tensors(path)
        if data_states:
            # A process that did not exist before takes rank 0's position in its own stream.
            mine = data_states[self.rank] if self.rank < len(data_states) else data_states[0]
            self.train_iter.load_state_dict(unflatten_state(mine, tensors))
        if saved_world != self.world_size:
            log.warning(
                "resuming a %d-process checkpoint with %d process(es): process streams of data and "
                "randomness continue where possible but differ from an uninterrupted run",
                saved_world,
                self.world_size,
            )
        for name, cb_state in state.get("callbacks", {}).items():
            for cb_name, cb in self.callbacks:
                if cb_name == name:
                    cb.load_state_dict(cb_state)
        rng = ckpt.read_rng(path, self.rank)
        if rng is not None:
            restore_rng(rng)
        else:
            seed_everything(self.cfg.run.seed + 7919 * self.rank + self.step)

    def _build_callbacks(self, extra: list[Callback]) -> list[tuple[str, Callback]]:
        """Built-ins that the config turns on, then `training.callbacks`, then `extra`."""
        out: list[tuple[str, Callback]] = []
        names = [n for n, _ in BUILTINS]
        for name in [*names, *[n for n in self.cfg.training.callbacks if n not in names]]:
            try:
                comp = registry.get("callback", name)
            except registry.RegistryError:
                known = ", ".join(registry.names("callback"))
                raise ConfigError(
                    f"training.callbacks: unknown callback {name!r}; registered: {known}"
                ) from None
            cb = comp.build_fn()(self.cfg)
            if isinstance(cb, ProgressCallback):
                cb.mode = self._progress_mode  # "auto" resolved against this console
            if cb is not None:
                out.append((name, cb))
        out += [(type(cb).__name__, cb) for cb in extra]
        return out

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
            getattr(cb, hook)(self, *args)

    # ------------------------------------------------------------------------------- loop

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
                export_dir=getattr(self, "_export_dir", None),
            )
        finally:
            self._signals.restore()
            try:
                self._call("on_train_end", status)
            finally:
                self.close()

    def close(self) -> None:
        """Release logging handlers and global switches (safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        if self._teardown_logging is not None:
            self._teardown_logging()
        torch.use_deterministic_algorithms(self._deterministic_before)
        # Let a later Trainer in this process choose another precision; the process group and
        # device (PartialState) stay.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)

    def _loop(self) -> str | None:
        cfg = self.cfg
        acc = self.accelerator
        accum = cfg.training.grad_accum_steps
        max_norm = cfg.training.grad_clip if cfg.training.grad_clip > 0 else math.inf
        check_grad = getattr(acc, "scaler", None) is None  # fp16: the scaler handles inf grads
        multi = self.world_size > 1
        self.model.train()
        t_start = time.perf_counter()
        window_t0, window_steps, paused = time.perf_counter(), 0, 0.0
        signal_stop: str | None = None

        while self.step < self.max_steps:
            step_no = self.step + 1
            batches = [next(self.train_iter) for _ in range(accum)]
            batches = [
                (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
                for x, y in batches
            ]  # (B, T) each
            # each micro-batch mean weighted by its share of the step's valid target tokens
            weights = (
                token_weights([y for _, y in batches], self.world_size)
                if accum > 1 or multi
                else None
            )
            losses = []
            for micro, (x, y) in enumerate(batches):
                sync = acc.no_sync(self.model) if micro < accum - 1 else contextlib.nullcontext()
                with sync:
                    _, loss = self.model(x, y)
                    scaled = loss if weights is None else loss * weights[micro]
                    scaled.backward() if self._direct else acc.backward(scaled)
                losses.append(scaled.detach())
            # this process's share of the step's token mean (the mean itself on one process)
            loss_mean = losses[0] if accum == 1 else torch.stack(losses).sum()
            if self._direct:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            else:
                grad_norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
                grad_norm = grad_norm.full_tensor()
            grad_norm = torch.as_tensor(grad_norm, device=self.device)
            vals = torch.stack([loss_mean.float(), grad_norm.float()])  # one host sync below
            stop_local = 1.0 if self._signals.received else 0.0
            if multi:
                # Every process must take the same decision: agree on both flags.
                bad_local = ~torch.isfinite(vals[0])
                if check_grad:
                    bad_local = bad_local | ~torch.isfinite(vals[1])
                flags = torch.stack([bad_local.float(), vals.new_tensor(stop_local)])
                torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
                loss_v, gnorm_v, bad_v, stop_v = torch.cat([vals, flags]).tolist()
            else:
                loss_v, gnorm_v = vals.tolist()
                bad = not math.isfinite(loss_v) or (check_grad and not math.isfinite(gnorm_v))
                bad_v, stop_v = float(bad), stop_local
            if bad_v > 0:
                self.optimizer.zero_grad(set_to_none=True)
                newest = self.last_checkpoint or "none written yet"
                raise TrainingError(
                    f"non-finite training loss ({loss_v}) or gradient norm ({gnorm_v}) at step "
                    f"{step_no}; stopped before the optimizer step, checkpoints on disk are "
                    f"intact (newest: {newest}); try a lower optimizer.lr, training.grad_clip or "
                    "training.precision"
                )

            lr = float(self._raw_optimizer.param_groups[0]["lr"])
            optimizer = self._raw_optimizer if self._direct else self.optimizer
            optimizer.step()
            self.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            self.step = step_no
            self.tokens_seen += self.tokens_per_step
            window_steps += 1

            self._call(
                "on_step_end",
                {
                    "step": step_no,
                    "loss": loss_v,
                    "lr": lr,
                    "grad_norm": gnorm_v,
                    "tokens": self.tokens_seen,
                },
            )

            if stop_v > 0 and signal_stop is None:
                signal_stop = self._signals.received or "a signal on another process"
                log.warning(
                    "received %s: finished step %d, writing a checkpoint and exiting "
                    "(Ctrl-C again aborts at once)",
                    signal_stop,
                    step_no,
                )
            last = step_no == self.max_steps or signal_stop is not None or bool(self._stop_reason)
            if step_no % cfg.training.log_interval == 0 or last or step_no == self.start_step + 1:
                loss_avg = loss_v
                if multi:
                    t = torch.tensor([loss_v], device=self.device)
                    loss_avg = float(acc.reduce(t, reduction="mean").item())
                now = time.perf_counter()
                busy = max(1e-9, now - window_t0 - paused)
                self._call(
                    "on_log",
                    {
                        "step": step_no,
                        "loss": loss_avg,
                        "lr": lr,
                        "grad_norm": gnorm_v,
                        "tokens": self.tokens_seen,
                        "tokens_per_s": window_steps * self.tokens_per_step / busy,
                        "ms_per_step": 1000.0 * busy / window_steps,
                        "elapsed_s": self._elapsed_before + now - t_start,
                    },
                )
                window_t0, window_steps, paused = time.perf_counter(), 0, 0.0

            t_pause = time.perf_counter()
            waited = step_no % cfg.eval.interval == 0
            if waited:
                self.evaluate()
            stopping = signal_stop is not None or self._stop_reason is not None
            if step_no % cfg.checkpoint.interval == 0 or stopping:
                waited = True
                self.save_checkpoint(elapsed=self._elapsed_before + time.perf_counter() - t_start)
            if waited and not stopping and any_process(self._signals.received, self.device, multi):
                # A signal during the evaluation or checkpoint: stop now, not after another step.
                signal_stop = self._signals.received or "a signal on another process"
                log.warning("received %s at step %d; exiting", signal_stop, step_no)
                if self._saved_step != step_no:
                    self.save_checkpoint(
                        elapsed=self._elapsed_before + time.perf_counter() - t_start
                    )
                stopping = True
            paused += time.perf_counter() - t_pause
            if stopping:
                if self._stop_reason:
                    log.info("%s; stopping at step %d", self._stop_reason, step_no)
                break
        self._elapsed_total = self._elapsed_before + time.perf_counter() - t_start
        return signal_stop

    def _finish(self, status: str, *, interrupted: bool) -> None:
        cfg = self.cfg
        if status == "completed":
            if cfg.eval.at_end and self._evaluated_step != self.step and self.step > 0:
                self.evaluate()
            if cfg.checkpoint.save_at_end and self._saved_step != self.step:
                self.save_checkpoint(elapsed=getattr(self, "_elapsed_total", 0.0))
        if cfg.checkpoint.export and not interrupted and self.step > 0:
            self._export()
        log.info(
            "%s at step %d%s%s",
            "finished" if status == "completed" else "stopped",
            self.step,
            f" | val loss {self.last_val_loss:.4f}" if self.last_val_loss is not None else "",
            f" | checkpoint {self.last_checkpoint}" if self.last_checkpoint else "",
        )

    # ------------------------------------------------------------------------------- eval

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss over the fixed eval batches, averaged over all processes."""
        if len(self._eval_batches) == 0:
            log.warning("eval: the validation split yields no batches; skipping evaluation")
            return None
        t0 = time.perf_counter()
        self.model.eval()
        total = torch.zeros(2, device=self.device)  # (sum of token losses, tokens)
        for i, counted in self._eval_plan:
            x, y = self._eval_batches[i]  # (B, T) each
            _, loss = self.model(x.to(self.device), y.to(self.device))
            if counted:
                total[0] += loss.float() * y.numel()
                total[1] += y.numel()
        self.model.train()
        if self.world_size > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        val = float((total[0] / total[1]).item())
        self.last_val_loss = val
        self._evaluated_step = self.step
        improved = self.best_val_loss is None or val < self.best_val_loss
        if improved:
            self.best_val_loss = val
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

    def _full_model_state(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            self._state_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return ckpt.retie_state(state, self._state_module)  # tied weights stored once

    def _best_checkpoint_name(self, root: Path) -> str | None:
        """The checkpoint `best` names once this step's is saved (`checkpoint.keep_best`).

        This step's checkpoint when it was evaluated and beats the validation loss of the current
        `best` checkpoint (not the best of all evaluations: those between checkpoints have no
        weights on disk), else the current `best`.
        """
        pointer = root / ckpt.BEST
        name = pointer.read_text().strip() if pointer.exists() else None
        best_loss = None
        if name and ckpt.checkpoint_step(Path(name)) is not None and ckpt.is_complete(root / name):
            best_loss = ckpt.read_trainer_state(root / name).get("last_val_loss")
        else:
            name = None
        here = self.last_val_loss if self._evaluated_step == self.step else None
        if here is not None and (best_loss is None or here < best_loss):
            return ckpt.checkpoint_name(self.step)
        return name

    def save_checkpoint(self, *, elapsed: float = 0.0) -> Path | None:
        """Write a checkpoint of the current step (collective: every process calls it)."""
        from accelerate.utils import gather_object
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        t0 = time.perf_counter()
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = self._full_model_state()
        optim_state = get_optimizer_state_dict(
            self._state_module, self._raw_optimizer, options=opts
        )
        rng_states = gather_object([capture_rng()])
        data_states = gather_object([self.train_iter.state_dict()])
        path: Path | None = None
        if self.is_main:
            tensors: dict[str, torch.Tensor] = {}
            data_json = [
                flatten_state(s, tensors, f"data/rank{r}") for r, s in enumerate(data_states)
            ]
            scaler = getattr(self.accelerator, "scaler", None)
            callback_states = {
                name: s for name, cb in self.callbacks if (s := cb.state_dict()) is not None
            }
            trainer_state = {
                "format": "craft-trainer-state",
                "version": ckpt.FORMAT_VERSION,
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "best_val_loss": self.best_val_loss,
                "last_val_loss": self.last_val_loss,
                "elapsed_s": elapsed,
                "world_size": self.world_size,
                "scheduler": scheduler_state(self.scheduler),
                "data": data_json,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "callbacks": callback_states,
                "config_hash": ckpt.config_hash(self.cfg),
                "versions": _versions(),
                "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
            root = self.run_dir / ckpt.CHECKPOINTS
            best_name = self._best_checkpoint_name(root) if self.cfg.checkpoint.keep_best else None
            protect = {best_name} if best_name else set()
            path = ckpt.save_checkpoint(
                root,
                self.step,
                model_state=model_state,
                optimizer_state=optim_state,
                rng_states=rng_states,
                trainer_state=trainer_state,
                config_toml=to_toml(self.cfg),
                tokenizer=self.tokenizer,
                keep_last=self.cfg.checkpoint.keep_last,
                protect=protect,
                trainer_tensors=tensors,
            )
            if best_name == path.name:
                atomic_write_text(root / ckpt.BEST, path.name + "\n")
            log.info("checkpoint: %s (%.2fs)", path, time.perf_counter() - t0)
        self.accelerator.wait_for_everyone()
        self._saved_step = self.step
        if path is not None:
            self.last_checkpoint = path
        if self.is_main and path is not None:
            self._call("on_checkpoint", path)
        return path

    def _export(self) -> None:
        state = self._full_model_state()
        if self.is_main:
            out = ckpt.write_export(
                self.run_dir / ckpt.EXPORT,
                model_state=state,
                config_toml=to_toml(self.cfg),
                tokenizer=self.tokenizer,
                step=self.step,
            )
            self._export_dir = out
            log.info("exported model: %s", out)
        self.accelerator.wait_for_everyone()
