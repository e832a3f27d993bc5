"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine schedule."""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from vlp.config import TrainConfig


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Norms, biases, embeddings, tokens, positions and the temperature get no weight decay."""
    leaf = name.rsplit(".", 1)[-1]
    return (
        param.ndim < 2
        or leaf in ("bias", "cls_token", "pos_embed", "logit_scale")
        or "embed" in name
        and "patch_embed" not in name
        or "norm" in name
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if no_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def freeze(model: nn.Module, patterns: list[str]) -> int:
    """Stop the gradient of every parameter whose name matches one of the fnmatch `patterns`
    (stagewise pretraining); returns how many were frozen. A pattern that matches nothing is
    an error (a typo would otherwise train what should stay fixed)."""
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ValueError(f"train.freeze: {pattern!r} matches no parameter (e.g. {names[:3]})")
    frozen = [p for name, p in model.named_parameters() if any(fnmatch.fnmatch(name, pat) for pat in patterns)]
    for param in frozen:
        param.requires_grad_(False)
    return len(frozen)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the fused kernel (one pass over each tensor instead of a
    chain of elementwise ops) where the device has it (docs/benchmarks.md: about 3% of a tiny
    CLIP step on a CPU)."""
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused
    )


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to min_lr / lr at the last step."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
