"""Momentum distillation (ALBEF Sec. 3.3, after MoCo): EMA encoders, feature queues, soft targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def ema_update(model: nn.Module, momentum_model: nn.Module, momentum: float) -> None:
    """p_m <- m * p_m + (1 - m) * p for every parameter pair (same names in both)."""
    pairs = zip(model.named_parameters(), momentum_model.named_parameters(), strict=True)
    for (name, p), (name_m, p_m) in pairs:
        if name != name_m:
            raise ValueError(f"momentum model does not mirror the model: {name} vs {name_m}")
        p_m.mul_(momentum).add_(p.detach(), alpha=1 - momentum)


def soft_itc_targets(sim_m: torch.Tensor, positive: torch.Tensor, alpha: float) -> torch.Tensor:
    """ITC targets with momentum distillation (ALBEF Sec. 3.3, eq. 5-6): alpha * softmax(sim_m)
    + (1 - alpha) * y, where y spreads each row's mass evenly over its `positive` entries.

    sim_m [N, K]: the momentum model's (scaled) similarities; positive [N, K] bool, each row at
    least one True (the true pair; also duplicates of it, when the caller knows them).
    """
    if not positive.any(dim=1).all():
        raise ValueError("every row of an ITC target needs at least one positive")
    y = positive.to(sim_m.dtype)
    return alpha * sim_m.softmax(dim=1) + (1 - alpha) * y / y.sum(dim=1, keepdim=True)


def alpha_ramp(alpha: float, step: int, ramp_steps: int) -> float:
    """The distillation weight, grown linearly from 0 over `ramp_steps` (ALBEF: the first epoch)."""
    return alpha if ramp_steps <= 0 else alpha * min(1.0, step / ramp_steps)


class FeatureQueue(nn.Module):
    """A circular queue of the last `size` momentum features (buffers: saved and resumed).

    It starts full of random unit vectors, as in ALBEF, so it can be used from the first step.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("features", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, x: torch.Tensor) -> None:
        """Write the rows of `x` after the last written one, wrapping around the end."""
        size = self.features.shape[0]
        x = x.detach()[-size:]
        rows = (int(self.ptr) + torch.arange(x.shape[0], device=x.device)) % size
        self.features[rows] = x.to(self.features.dtype)
        self.ptr.fill_((int(self.ptr) + x.shape[0]) % size)
