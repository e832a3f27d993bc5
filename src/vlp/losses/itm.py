"""Image-text matching with hard negatives (ALBEF Sec. 3.2; BLIP Sec. 3.2).

For each image one negative text, and for each text one negative image, is drawn from the
gathered batch with probability softmax(ITC similarity): similar but wrong pairs, the ones a
fusion encoder learns most from. The positive, and any caption identical to it, is never drawn.
"""

from __future__ import annotations

import torch


def caption_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """An int64 key per caption, equal for identical token sequences (a fixed linear hash of
    the ids; a collision would only exclude one extra negative)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    weights = (positions * 2654435761 + 97531) % 2147483647 + 1
    return ((input_ids + 1) * attention_mask * weights).sum(dim=1)


def positive_mask(keys: torch.Tensor, all_keys: torch.Tensor, offset: int) -> torch.Tensor:
    """[B_local, B_global] True where the pair is the true one (row i, column offset + i) or the
    caption is identical to the true one."""
    mask = keys[:, None] == all_keys[None, :]
    rows = torch.arange(keys.shape[0], device=keys.device)
    mask[rows, rows + offset] = True
    return mask


@torch.no_grad()
def hard_negatives(
    sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, positive: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global indices of one negative text per image and one negative image per text.

    sim_i2t[i, j]: image i (local) vs text j (global); sim_t2i[t, j]: text t vs image j;
    `positive` marks pairs that must not be drawn (same for both directions: pair i <-> i).
    A row whose similarities give no usable distribution (NaN or infinite entries) is drawn
    uniformly over its non-positives.
    """
    if positive.all(dim=1).any():
        row = int(positive.all(dim=1).nonzero()[0])
        raise ValueError(
            f"no negative to draw for batch item {row}: every caption in the batch "
            "is identical to its own; ITM needs at least two different captions"
        )
    draws = []
    for sim in (sim_i2t, sim_t2i):
        weights = sim.float().masked_fill(positive, float("-inf")).softmax(dim=1)
        broken = weights.isnan().any(dim=1, keepdim=True)
        weights = torch.where(broken, (~positive).float(), weights)
        draws.append(torch.multinomial(weights, 1, generator=generator).squeeze(1))
    return draws[0], draws[1]
