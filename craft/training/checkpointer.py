"""What a checkpoint holds of a live run, and putting it back: one list of stateful parts.

`trainer_state.json` is the `TrainState` counters plus one entry per part (`scheduler`, `scaler`,
`callbacks`), each written by the part's `state_dict()` and read back by its `load_state_dict()`;
next to it the model weights, the optimizer state, every process's data-stream position and RNG
states. The file format itself (directories, atomic commit, `latest`, pruning) is
`craft.training.checkpoint`.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from craft.config import to_toml
from craft.errors import CheckpointError
from craft.fileio import atomic_write_text, storage_error
from craft.training import checkpoint as ckpt
from craft.training.rng import capture_rng, restore_rng, seed_everything
from craft.training.runtime import decided_on_main, versions
from craft.training.schedulers import restore_scheduler, scheduler_state
from craft.training.state import TrainState
from craft.training.state_io import flatten_state, load_state, unflatten_state

log = logging.getLogger("craft.training")


class _SchedulerPart:
    def __init__(self, scheduler: Any, state: TrainState) -> None:
        self.scheduler, self.state = scheduler, state

    def state_dict(self) -> dict[str, Any]:
        return scheduler_state(self.scheduler)

    def load_state_dict(self, saved: dict[str, Any] | None) -> None:
        restore_scheduler(self.scheduler, saved or {}, self.state.step)  # after the counters


class _ScalerPart:
    def __init__(self, scaler: Any) -> None:
        self.scaler = scaler

    def state_dict(self) -> dict[str, Any] | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, saved: dict[str, Any] | None) -> None:
        if self.scaler is not None and saved:
            self.scaler.load_state_dict(saved)


class _CallbacksPart:
    def __init__(self, callbacks: list[tuple[str, Any]]) -> None:
        self.callbacks = callbacks

    def state_dict(self) -> dict[str, Any]:
        return {name: s for name, cb in self.callbacks if (s := cb.state_dict()) is not None}

    def load_state_dict(self, saved: dict[str, Any] | None) -> None:
        for name, cb_state in (saved or {}).items():
            for cb_name, cb in self.callbacks:
                if cb_name == name:
                    cb.load_state_dict(cb_state)


class Checkpointer:
    """Saves the run's state as `<run_dir>/checkpoints/step_XXXXXXXX/` and restores it.

    `save` and `export` are collective (every process calls them; the main process writes).
    `module` is the model whose state dicts are read (the FSDP-wrapped one under FSDP);
    `train_iter()` gives the training batch stream (looked up each time: it may be replaced).
    """

    def __init__(
        self,
        *,
        cfg: Any,
        run_dir: Path,
        state: TrainState,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        train_iter: Callable[[], Any],
        callbacks: list[tuple[str, Any]],
        tokenizer: Any,
        accelerator: Any,
    ) -> None:
        self.cfg, self.run_dir, self.state = cfg, run_dir, state
        self.module, self.optimizer, self.train_iter = module, optimizer, train_iter
        self.tokenizer, self.acc = tokenizer, accelerator
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.parts = {
            "scheduler": _SchedulerPart(scheduler, state),
            "scaler": _ScalerPart(getattr(accelerator, "scaler", None)),
            "callbacks": _CallbacksPart(callbacks),
        }

    @property
    def root(self) -> Path:
        return self.run_dir / ckpt.CHECKPOINTS

    # ------------------------------------------------------------------------------ saving

    def model_state(self) -> dict[str, torch.Tensor]:
        """The full (unsharded) model state on the CPU, tied weights as one tensor."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return ckpt.retie_state(state, self.module)

    def trainer_state(self, data_states: list[Any], tensors: dict[str, torch.Tensor]) -> dict:
        """The `trainer_state.json` document (data states flattened into `tensors`)."""
        return {
            "format": "craft-trainer-state",
            "version": ckpt.FORMAT_VERSION,
            **self.state.state_dict(),
            "world_size": self.world_size,
            **{name: part.state_dict() for name, part in self.parts.items()},
            "data": [flatten_state(s, tensors, f"data/rank{r}") for r, s in enumerate(data_states)],
            "config_hash": ckpt.config_hash(self.cfg),
            "versions": versions(),
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }

    def save(self) -> Path | None:
        """Write a checkpoint of the current step; its path on the main process, else None."""
        from accelerate.utils import gather_object
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        t0 = time.perf_counter()
        model_state = self.model_state()
        optim_state = get_optimizer_state_dict(
            self.module,
            self.optimizer,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )
        rng_states = gather_object([capture_rng()])
        data_states = gather_object([self.train_iter().state_dict()])

        def write() -> Path:
            tensors: dict[str, torch.Tensor] = {}
            doc = self.trainer_state(data_states, tensors)
            best = self._best_name() if self.cfg.checkpoint.keep_best else None
            try:
                path = ckpt.save_checkpoint(
                    self.root,
                    self.state.step,
                    model_state=model_state,
                    optimizer_state=optim_state,
                    rng_states=rng_states,
                    trainer_state=doc,
                    config_toml=to_toml(self.cfg),
                    tokenizer=self.tokenizer,
                    keep_last=self.cfg.checkpoint.keep_last,
                    protect={best} if best else set(),
                    trainer_tensors=tensors,
                )
                if best == path.name:
                    atomic_write_text(self.root / ckpt.BEST, path.name + "\n")
            except Exception as e:  # a full disk, a directory made read-only: one line, exit 2
                err = storage_error(
                    e, f"writing checkpoint {self.state.step} in {self.root}", name_file=False
                )
                if err is None:
                    raise
                newest = ckpt.latest_checkpoint(self.root)
                raise type(err)(
                    f"{err.message}; "
                    + (
                        f"{newest.name} is the newest complete checkpoint"
                        if newest is not None
                        else "the run has no complete checkpoint"
                    )
                ) from None
            log.info("checkpoint: %s (%.2fs)", path, time.perf_counter() - t0)
            return path

        # Every process learns the outcome (a failed write is every process's error).
        path = decided_on_main(write, is_main=self.is_main, world_size=self.world_size)
        if not self.is_main:
            path = None
        self.acc.wait_for_everyone()
        self.state.saved_step = self.state.step
        if path is not None:
            self.state.last_checkpoint = path
        return path

    def _best_name(self) -> str | None:
        """The checkpoint `best` names once this step's is saved (`checkpoint.keep_best`).

        This step's checkpoint when it was evaluated and beats the validation loss of the current
        `best` checkpoint (not the best of all evaluations: those between checkpoints have no
        weights on disk), else the current `best`.
        """
        pointer = self.root / ckpt.BEST
        name = pointer.read_text().strip() if pointer.exists() else None
        best_loss = None
        if (
            name
            and ckpt.checkpoint_step(Path(name)) is not None
            and ckpt.is_complete(self.root / name)
        ):
            best_loss = ckpt.read_trainer_state(self.root / name).get("last_val_loss")
        else:
            name = None
        st = self.state
        here = st.last_val_loss if st.evaluated_step == st.step else None
        if here is not None and (best_loss is None or here < best_loss):
            return ckpt.checkpoint_name(st.step)
        return name

    def export(self) -> Path | None:
        """`<run_dir>/model/`: weights, config and tokenizer (collective; path on the main)."""
        state = self.model_state()

        def write() -> Path:
            target = self.run_dir / ckpt.EXPORT
            try:
                out = ckpt.write_export(
                    target,
                    model_state=state,
                    config_toml=to_toml(self.cfg),
                    tokenizer=self.tokenizer,
                    step=self.state.step,
                )
            except Exception as e:
                err = storage_error(e, f"exporting the model to {target}", name_file=False)
                if err is None:
                    raise
                raise type(err)(f"{err.message}; the checkpoints are intact") from None
            log.info("exported model: %s", out)
            return out

        out = decided_on_main(write, is_main=self.is_main, world_size=self.world_size)
        self.acc.wait_for_everyone()
        return out if self.is_main else None

    # ------------------------------------------------------------------------------ restoring

    def restore(self, path: Path, doc: dict[str, Any]) -> None:
        """Everything but the model weights (loaded before the model was wrapped) from `path`,
        whose `trainer_state.json` is `doc`."""
        try:
            self._restore(path, doc)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            # Files of the right size whose content is not what this version wrote.
            raise CheckpointError(
                f"{path}: malformed training state ({type(e).__name__}: {e}); "
                "resume from another checkpoint"
            ) from e

    def _restore(self, path: Path, doc: dict[str, Any]) -> None:
        self._restore_optimizer(path)
        self.state.load_state_dict(doc)
        self.state.last_checkpoint = path
        for name, part in self.parts.items():
            part.load_state_dict(doc.get(name))

        saved_world = int(doc.get("world_size", 1))
        data_states = doc.get("data", [])
        if data_states:
            # A process that did not exist before takes rank 0's position in its own stream.
            mine = data_states[self.rank] if self.rank < len(data_states) else data_states[0]
            tensors = ckpt.read_trainer_tensors(path)
            self.train_iter().load_state_dict(unflatten_state(mine, tensors))
        if saved_world != self.world_size:
            log.warning(
                "resuming a %d-process checkpoint with %d process(es): process streams of data and "
                "randomness continue where possible but differ from an uninterrupted run",
                saved_world,
                self.world_size,
            )
        rng = ckpt.read_rng(path, self.rank)
        if rng is not None:
            restore_rng(rng)
        else:
            seed_everything(self.cfg.run.seed + 7919 * self.rank + self.state.step)

    def _restore_optimizer(self, path: Path) -> None:
        """The optimizer state of `path`, with the hyperparameters (lr, betas, weight decay) of
        the current config."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        try:
            osd, _ = load_state(path, "optimizer")
        except Exception as e:  # corrupt JSON or safetensors; the COMPLETE marker checks sizes only
            raise CheckpointError(f"{path}: cannot read the optimizer state: {e}") from None
        groups = self.optimizer.param_groups
        saved_groups = osd["param_groups"]
        if len(saved_groups) != len(groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, groups, strict=True)
        ):
            raise CheckpointError(
                f"{path}/optimizer.json: parameter groups do not match the optimizer of this "
                f"config ({[len(s['params']) for s in saved_groups]} vs "
                f"{[len(g['params']) for g in groups]} parameters)"
            )
        osd["param_groups"] = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": s["params"]}
            for s, g in zip(saved_groups, groups, strict=True)
        ]
        try:
            set_optimizer_state_dict(
                self.module, self.optimizer, osd, options=StateDictOptions(full_state_dict=True)
            )
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(
                f"{path}: optimizer state does not fit this optimizer: {e}"
            ) from None
