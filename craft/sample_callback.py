"""The `sample` training callback: a text sample every `logging.sample_interval` steps.

It lives beside generation, which it drives: training knows it only by its registered name.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from craft.generation import generate
from craft.training.callbacks import Callback, RunContext

log = logging.getLogger("craft.training")


def sample_text(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, seed: int) -> str:
    """`prompt` and its continuation, through the same code path as `craft generate`."""
    texts = generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, seed=seed)
    return prompt + texts[0]


class SampleCallback(Callback):
    """Logs a text sample every `interval` steps and at the last step.

    Sampling runs under `torch.random.fork_rng` with its own seed, so it never changes the
    training RNG stream (exact resume holds with samples on).
    """

    def __init__(self, interval: int, tokens: int, prompt: str, seed: int) -> None:
        self.interval = interval
        self.tokens = tokens
        self.prompt = prompt
        self.seed = seed

    def on_step_end(self, run: RunContext, metrics: Any) -> None:
        step = metrics["step"]
        if step % self.interval and step != run.max_steps:
            return
        if not run.can_sample or run.tokenizer is None:
            return
        model = run.model
        was_training = model.training
        model.eval()
        devices = [run.device] if run.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                text = sample_text(model, run.tokenizer, self.prompt, self.tokens, self.seed)
        except Exception as e:  # a sample must never kill a training run
            log.warning("sample at step %d failed: %s: %s", step, type(e).__name__, e)
            return
        finally:
            model.train(was_training)
        log.info("sample at step %d:\n%s", step, text)


def build_sample(cfg: Any) -> Callback | None:
    if cfg.logging.sample_interval <= 0:
        return None
    return SampleCallback(
        cfg.logging.sample_interval,
        cfg.logging.sample_tokens,
        cfg.logging.sample_prompt,
        cfg.run.seed,
    )
