"""Captioning (language modelling) loss of an image-grounded decoder (BLIP Sec. 3.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            prompt_length: int = 1, label_smoothing: float = 0.1) -> torch.Tensor:
    """Next-token cross-entropy with label smoothing: logits at t predict token t + 1.

    Tokens at positions < `prompt_length` (the start token and a prompt such as "a picture of ",
    BLIP Sec. 4.3) and padding are not predicted; the loss is the mean over scored tokens.
    """
    targets = input_ids[:, 1:].clone()
    scored = attention_mask[:, 1:].bool()
    scored[:, : max(prompt_length - 1, 0)] = False
    targets[~scored] = -100
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, label_smoothing=label_smoothing)
