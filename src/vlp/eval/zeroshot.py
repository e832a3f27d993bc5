"""Zero-shot classification with prompt ensembles (CLIP, Radford et al. 2021, Sec. 3.1.4)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vlp.losses.itc import dot_similarity


def class_embeddings(
    embed_texts: Callable[[list[str]], torch.Tensor], class_names: list[str], templates: list[str]
) -> torch.Tensor:
    """[C, D]: per class, the mean of its normalised prompt embeddings, renormalised."""
    prompts = [template.format(name) for name in class_names for template in templates]
    emb = F.normalize(embed_texts(prompts), dim=-1).view(len(class_names), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def zeroshot_accuracy(
    image_emb: torch.Tensor,
    labels: torch.Tensor,
    class_emb: torch.Tensor,
    similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = dot_similarity,
) -> float:
    """Top-1 accuracy (%) of the nearest class embedding (`similarity(images, classes)`)."""
    predictions = similarity(image_emb, class_emb).argmax(dim=1)
    return 100.0 * (predictions == labels).float().mean().item()
