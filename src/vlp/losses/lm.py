"""Captioning (language modelling) loss of an image-grounded decoder (BLIP Sec. 3.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int | torch.Tensor = 1,
    label_smoothing: float = 0.1,
) -> torch.Tensor:
    """Next-token cross-entropy with label smoothing: logits at t predict token t + 1.

    Tokens at positions < `prompt_length` (the start token and a prompt such as "a picture of ",
    BLIP Sec. 4.3; an int, or one per caption as a [B] tensor) and padding are not predicted;
    the loss is the mean over scored tokens.
    """
    positions = torch.arange(1, input_ids.shape[1], device=input_ids.device)
    prompt = torch.as_tensor(prompt_length, device=input_ids.device).reshape(-1, 1)
    scored = attention_mask[:, 1:].bool() & (positions >= prompt)
    targets = input_ids[:, 1:].masked_fill(~scored, -100)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        label_smoothing=label_smoothing,
    )
