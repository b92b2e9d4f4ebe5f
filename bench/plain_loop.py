"""The baseline of the training benchmarks: nanoGPT's `train.py` loop in plain PyTorch.

Same model (built from the recipe through the registry, or with nanoGPT's own blocks via
`NANOGPT_BLOCK`), same prepared data, optimizer settings, schedule and clipping as the recipe;
batches sampled nanoGPT-style (random windows of train.bin), AdamW with decay on matrices only,
warmup then cosine, `clip_grad_norm_`. No Accelerate, no callbacks, no checks: what a user would
write by hand.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

# Overrides that give Craft's GPT nanoGPT's block: learned positions, LayerNorm, GELU MLP.
NANOGPT_BLOCK = ["model.positions=learned", "model.norm=layernorm", "model.mlp=gelu"]

# nanoGPT's published CPU setting for its character model, every setting spelled out so that a
# baseline built with these does not follow a recipe's changes: README "baby GPT" command
# (`config/train_shakespeare_char.py --device=cpu --compile=False --block_size=64 --batch_size=12
# --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`) over
# that config's and train.py's defaults (lr 1e-3, min_lr 1e-4, warmup 100, beta2 0.99, weight
# decay 0.1, grad_clip 1.0, no bias). `training.max_steps` plays lr_decay_iters here.
NANOGPT_CPU = [
    *NANOGPT_BLOCK,
    "model.n_layer=4",
    "model.n_head=4",
    "model.d_model=128",
    "model.block_size=64",
    "model.dropout=0.0",
    "model.bias=false",
    "training.batch_size=12",
    "training.grad_clip=1.0",
    "training.max_steps=2000",
    "optimizer.type=adamw",
    "optimizer.lr=1e-3",
    "optimizer.betas=[0.9,0.99]",
    "optimizer.weight_decay=0.1",
    "scheduler.type=cosine",
    "scheduler.warmup_steps=100",
    "scheduler.min_lr=1e-4",
]


class PlainLoop:
    """Model, optimizer, schedule and batches of `cfg`, and one optimizer step at a time."""

    def __init__(self, cfg: Any) -> None:
        from craft.data.datasets import PreparedDataset
        from craft.training.builders import build_data, build_model

        self.cfg = cfg
        self.device = torch.device(
            "cuda" if torch.cuda.is_available() and not cfg.run.cpu else "cpu"
        )
        torch.manual_seed(cfg.run.seed)
        self.dm = build_data(cfg, rank=0, world_size=1, is_main=True, wait=lambda: None)
        self.train = PreparedDataset(self.dm.dir).split("train")
        self.model = build_model(cfg, self.dm.vocab_size, kernels=cfg.kernels).to(self.device)
        params = list(self.model.parameters())
        opt = cfg.optimizer
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": opt.weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ],
            lr=opt.lr,
            betas=tuple(opt.betas),
            fused=self.device.type == "cuda",
        )
        self.batch_size, self.block = cfg.training.batch_size, cfg.model.block_size
        self.model.train()

    def lr(self, it: int) -> float:
        """nanoGPT's get_lr: linear warmup, cosine to min_lr at max_steps, then min_lr."""
        lr, sched = self.cfg.optimizer.lr, self.cfg.scheduler
        warmup, min_lr, max_steps = sched.warmup_steps, sched.min_lr, self.cfg.training.max_steps
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        ratio = min(1.0, (it - warmup) / max(1, max_steps - warmup))
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, data = self.batch_size, self.block, self.train
        ix = torch.randint(len(data) - T, (B,))
        x = torch.stack([torch.from_numpy(data[i : i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + T].astype(np.int64)) for i in ix])
        return x.to(self.device), y.to(self.device)

    def step(self, it: int) -> torch.Tensor:
        """One optimizer step (iteration `it`, from 0); the loss, left on the device."""
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr(it)
        x, y = self.batch()
        _, loss = self.model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.training.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def val_loss(self, windows: int) -> float:
        """Validation loss over the same fixed windows Craft's Trainer evaluates."""
        from craft.training.validation import eval_shard, validation_loss

        batches = self.dm.eval_batches("val", self.batch_size, windows=windows)
        return validation_loss(self.model, batches, eval_shard(len(batches), 0, 1), self.device)
