"""The fixed config sections. Every field is documented where it is declared.

Component sections (`model`, `data`, `tokenizer`, `optimizer`, `scheduler`) are discriminated by
`type` and live in `components.py`, registered in the component registry.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    """Base of every config model: unknown keys are errors and a validated config is frozen."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        validate_default=True,
        # Numbers and booleans keep their type: `true` is not 1, 1 is not `true`, "5" is not 5
        # (an int is still a valid float). Non-finite floats (nan, inf) are never meaningful.
        strict=True,
        allow_inf_nan=False,
    )


Backend = Literal["auto", "torch", "eager", "triton", "cuda"]
MAX_SEED = 2**63 - 1  # seeds are 64-bit in torch; one bit is left for per-process offsets


class RunConfig(Section):
    name: str = Field(
        "run",
        min_length=1,
        description="Run name (one path component); outputs go to <output_dir>/<name>/<timestamp>/.",
    )
    seed: int = Field(
        1337,
        ge=0,
        le=MAX_SEED,
        description="Seed for python, numpy and torch RNGs and the data sampler.",
    )
    output_dir: str = Field("outputs", description="Root directory of run directories.")
    deterministic: bool = Field(
        False,
        description="Use deterministic algorithms (torch.use_deterministic_algorithms); needed for bitwise resume.",
    )
    cpu: bool = Field(False, description="Force the CPU even when an accelerator is available.")

    @field_validator("name")
    @classmethod
    def _one_component(cls, name: str) -> str:
        if name in (".", "..") or any(c in name for c in "/\\\0"):
            raise ValueError(
                f"{name!r} is not a single directory name (no '/', '\\', '.' or '..'): a run "
                "name must stay inside run.output_dir"
            )
        return name


class TrainingConfig(Section):
    max_steps: int = Field(1000, ge=1, description="Optimizer steps to train for.")
    batch_size: int = Field(12, ge=1, description="Micro-batch size per process (sequences).")
    grad_accum_steps: int = Field(
        1, ge=1, description="Micro-batches accumulated per optimizer step."
    )
    precision: Literal["auto", "no", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Mixed precision: auto (bf16 where the hardware runs it faster, else fp32; "
        "see craft/training/precision.py), fp32 (or no), bf16, or fp16 with a dynamic loss scaler.",
    )
    precision_auto: str | None = Field(
        None,
        description="Written by the run when precision was auto: why it chose the precision "
        "recorded above (leave unset).",
    )
    grad_clip: float = Field(
        1.0, ge=0.0, description="Clip the global gradient norm to this; 0 disables."
    )
    compile: bool = Field(False, description="Wrap the model in torch.compile.")
    log_interval: int = Field(10, ge=1, description="Steps between logged training metrics.")
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description="Stop after this many evaluations without a new best validation loss.",
    )
    callbacks: list[str] = Field(
        default_factory=list, description="Extra registered callbacks to attach by name."
    )

    @field_validator("callbacks")
    @classmethod
    def _registered(cls, names: list[str]) -> list[str]:
        from craft.config import registry

        known = registry.names("callback")
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(
                f"unknown callback {unknown[0]!r}; registered: {', '.join(known)} (a plugin's "
                "callbacks need its module in imports)"
            )
        return names


DEFAULT_EVAL_WINDOWS = 600


class EvalConfig(Section):
    interval: int = Field(
        250, ge=1, description="Steps between evaluations on the validation split."
    )
    windows: int | None = Field(
        None,
        ge=1,
        description="Validation windows (model.block_size tokens each) scored per evaluation, "
        "spread evenly over the split (all of them when it has fewer). The same whatever the "
        f"batch sizes, so runs are comparable. Default {DEFAULT_EVAL_WINDOWS}.",
    )
    batches: int | None = Field(
        None,
        ge=1,
        description="Deprecated: scores batches x eval batch size windows, so the result depends "
        "on the batch size. Use eval.windows.",
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        description="Windows per forward pass when evaluating (memory and speed only, the result "
        "does not depend on it); defaults to training.batch_size.",
    )
    at_end: bool = Field(True, description="Evaluate once more after the last step.")

    @model_validator(mode="before")
    @classmethod
    def _one_count(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if "windows" in data and "batches" in data:
                raise ValueError(
                    "set eval.windows or the deprecated eval.batches, not both (remove eval.batches)"
                )
            if "batches" not in data and "windows" not in data:
                data = {**data, "windows": DEFAULT_EVAL_WINDOWS}  # stored with the run's config
        return data


class CheckpointConfig(Section):
    interval: int = Field(500, ge=1, description="Steps between checkpoints.")
    keep_last: int = Field(
        3,
        ge=1,
        description="Complete checkpoints kept; older ones are deleted after a new one is written.",
    )
    save_at_end: bool = Field(True, description="Write a checkpoint after the last step.")
    keep_best: bool = Field(
        False, description="Also keep the checkpoint with the best validation loss as `best`."
    )
    export: bool = Field(
        True,
        description="At the end of a run, write the model weights, config and tokenizer to <run>/model/ (enough for craft generate).",
    )


class LoggingConfig(Section):
    progress: Literal["auto", "rich", "plain", "none"] = Field(
        "auto",
        description="Progress display: rich bar on a terminal, plain log lines otherwise (auto).",
    )
    trackers: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list,
        description="Accelerate trackers to log to (used only when installed).",
    )
    sample_interval: int = Field(
        0, ge=0, description="Steps between text samples in the log; 0 disables."
    )
    sample_tokens: int = Field(200, ge=1, description="Tokens generated for each sample.")
    sample_prompt: str = Field("\n", description="Prompt for text samples.")
    plot: bool = Field(True, description="Write loss_curve.png in the run directory at the end.")


class KernelsConfig(Section):
    attention: Backend = Field("auto", description="Backend of craft.ops.attention.")
    cross_entropy: Backend = Field("auto", description="Backend of craft.ops.cross_entropy.")
    linear_cross_entropy: Backend = Field(
        "auto", description="Backend of craft.ops.linear_cross_entropy (fused output layer + loss)."
    )
    norm: Backend = Field("auto", description="Backend of craft.ops.norm (LayerNorm/RMSNorm).")
    fused_loss: bool = Field(
        False,
        description="Compute the training loss with linear_cross_entropy from the last hidden state, never materialising all logits.",
    )
