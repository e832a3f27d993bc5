"""Masked image modeling (BEiT, Bao et al. 2022, Sec. 2.2-2.3): hide blocks of patches and
predict their visual token ids. The loss is `vlp.losses.mlm.mlm_loss` on the hidden patches."""

from __future__ import annotations

import math

import torch


def block_mask(
    batch: int, grid: int, ratio: float = 0.4, min_patches: int = 4, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[B, grid * grid] boolean mask, True where a patch is hidden: rectangles of at least
    `min_patches` patches, aspect ratio in [0.3, 1/0.3], added until `ratio` of the patches are
    hidden (BEiT's blockwise masking, Algorithm 1; the last block may overshoot slightly)."""
    if not 0 < ratio < 1:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    target = round(ratio * grid * grid)
    masks = torch.zeros(batch, grid, grid, dtype=torch.bool)
    for mask in masks:
        while mask.sum() < target:
            area = _uniform(min_patches, max(min_patches, target - int(mask.sum())), generator)
            aspect = math.exp(_uniform(math.log(0.3), math.log(1 / 0.3), generator))
            height = min(grid, max(1, round(math.sqrt(area * aspect))))
            width = min(grid, max(1, round(math.sqrt(area / aspect))))
            top = int(torch.randint(grid - height + 1, (1,), generator=generator))
            left = int(torch.randint(grid - width + 1, (1,), generator=generator))
            mask[top : top + height, left : left + width] = True
    return masks.flatten(1)


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))
