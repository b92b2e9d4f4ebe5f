"""The fixed config sections. Every field is documented where it is declared.

Component sections (`model`, `data`, `tokenizer`, `optimizer`, `scheduler`) are discriminated by
`type` and live in `components.py`, registered in the component registry.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """Base of every config model: unknown keys are errors and a validated config is frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


Backend = Literal["auto", "torch", "eager", "triton", "cuda"]


class RunConfig(Section):
    name: str = Field(
        "run", min_length=1, description="Run name; outputs go to <output_dir>/<name>/<timestamp>/."
    )
    seed: int = Field(
        1337, ge=0, description="Seed for python, numpy and torch RNGs and the data sampler."
    )
    output_dir: str = Field("outputs", description="Root directory of run directories.")
    deterministic: bool = Field(
        False,
        description="Use deterministic algorithms (torch.use_deterministic_algorithms); needed for bitwise resume.",
    )
    cpu: bool = Field(False, description="Force the CPU even when an accelerator is available.")


class TrainingConfig(Section):
    max_steps: int = Field(1000, ge=1, description="Optimizer steps to train for.")
    batch_size: int = Field(12, ge=1, description="Micro-batch size per process (sequences).")
    grad_accum_steps: int = Field(
        1, ge=1, description="Micro-batches accumulated per optimizer step."
    )
    precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="Mixed precision: no (fp32), bf16, or fp16 with a dynamic loss scaler."
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


class EvalConfig(Section):
    interval: int = Field(
        250, ge=1, description="Steps between evaluations on the validation split."
    )
    batches: int = Field(50, ge=1, description="Validation batches per evaluation.")
    batch_size: int | None = Field(
        None, ge=1, description="Eval batch size; defaults to training.batch_size."
    )
    at_end: bool = Field(True, description="Evaluate once more after the last step.")


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
