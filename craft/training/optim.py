"""Optimizer builders: weight decay on matrices (dim >= 2) only, fused AdamW on CUDA."""

from __future__ import annotations

from typing import Any

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: matrices (embeddings, linear weights) decay; biases and norm gains do not.

    Tied parameters appear once (named_parameters removes duplicates).
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _on_cuda(model: torch.nn.Module) -> bool:
    return any(p.is_cuda for p in model.parameters())


def build_adamw(cfg: Any, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW; the fused kernel is used when the parameters are on CUDA (unless `fused = false`).

    The Trainer moves the model to its device before building the optimizer, so the default
    follows the device the run uses.
    """
    fused = cfg.fused if cfg.fused is not None else _on_cuda(model)
    kwargs: dict[str, Any] = {"fused": True} if fused else {}
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        **kwargs,
    )


def build_sgd(cfg: Any, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum; weight decay on matrices only."""
    return torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum)
