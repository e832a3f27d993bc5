"""Compositional swap probe (ARO / SugarCrepe style): does the model score the true caption of
an image above its attribute- or relation-swapped twin? Chance is 50 %."""

from __future__ import annotations

import torch


def swap_probe_accuracy(true_score: torch.Tensor, false_score: torch.Tensor) -> float:
    """Accuracy (%) over pairs: how often the true caption scores above its swapped twin (each
    pair's image-text similarity or match probability). Ties count as misses."""
    return 100.0 * (true_score > false_score).float().mean().item()
