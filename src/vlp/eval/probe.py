"""Compositional swap probe (ARO / SugarCrepe style): does the model score the true caption of
an image above its attribute- or relation-swapped twin? Chance is 50 %."""

from __future__ import annotations

import torch


def swap_probe_accuracy(image_emb: torch.Tensor, true_emb: torch.Tensor, false_emb: torch.Tensor,
                        pair_image: torch.Tensor) -> float:
    """Accuracy (%) over pairs; pair p belongs to image `pair_image[p]`. Ties count as misses."""
    images = image_emb[pair_image]
    wins = (images * true_emb).sum(dim=1) > (images * false_emb).sum(dim=1)
    return 100.0 * wins.float().mean().item()
