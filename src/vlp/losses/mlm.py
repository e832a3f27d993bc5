"""Masked language modelling (BERT, Devlin et al. 2019, Sec. 3.1), conditioned on the image in
ALBEF (Sec. 3.2), with the momentum model's soft targets (Sec. 3.3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE = -100  # label of positions that are not scored


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int],
    prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose `prob` of the real, non-special tokens; of those 80 % become [MASK], 10 % a random
    non-special token, 10 % stay. Returns (masked ids, labels: the original id where chosen,
    -100 elsewhere)."""
    device = input_ids.device
    draw = lambda: torch.rand(input_ids.shape, generator=generator, device=device)  # noqa: E731
    special = torch.tensor(list(special_ids), dtype=torch.long, device=device)
    candidate = attention_mask.bool() & ~torch.isin(input_ids, special)
    chosen = candidate & (draw() < prob)
    labels = torch.where(chosen, input_ids, IGNORE)
    to_mask = chosen & (draw() < 0.8)
    to_random = chosen & ~to_mask & (draw() < 0.5)
    allowed = torch.ones(vocab_size, dtype=torch.bool, device=device)
    allowed[special[special < vocab_size]] = False
    allowed[mask_id] = False
    pool = allowed.nonzero().squeeze(1)
    random_ids = pool[torch.randint(len(pool), input_ids.shape, generator=generator, device=device)]
    masked = torch.where(to_mask, mask_id, torch.where(to_random, random_ids, input_ids))
    return masked, labels


def mask_caption(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, tokens: dict[str, int], vocab_size: int, prob: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`mask_tokens` for BERT-framed captions: `tokens` holds the tokenizer's special ids; [PAD],
    [CLS] and [SEP] are never chosen, chosen tokens become `tokens["mask"]`."""
    return mask_tokens(
        input_ids,
        attention_mask,
        tokens["mask"],
        vocab_size,
        special_ids=[tokens[k] for k in ("pad", "cls", "sep")],
        prob=prob,
    )


def mlm_loss(
    logits: torch.Tensor, labels: torch.Tensor, soft_targets: torch.Tensor | None = None, alpha: float = 0.0
) -> torch.Tensor:
    """Cross-entropy on the labelled positions; with `soft_targets` (probabilities from the
    momentum model) the loss is (1 - alpha) CE(labels) + alpha CE(soft targets)."""
    scored = labels != IGNORE
    if not scored.any():
        return logits.sum() * 0.0  # nothing masked in this batch: a zero that keeps the graph
    hard = F.cross_entropy(logits[scored], labels[scored])
    if soft_targets is None or alpha == 0:
        return hard
    soft = -(soft_targets[scored] * F.log_softmax(logits[scored], dim=-1)).sum(dim=-1).mean()
    return (1 - alpha) * hard + alpha * soft
