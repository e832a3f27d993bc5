"""Compositional swap probe (ARO / SugarCrepe style): does the model score the true caption of
an image above its attribute- or relation-swapped twin? Chance is 50 %."""

from __future__ import annotations

import torch

from vlp.data.formats import CaptionDataset
from vlp.data.sample import Skipped
from vlp.eval.encode import embed_images, embed_texts, itm_scorer, paired, record_skips
from vlp.models.recipe import Recipe


def swap_probe_accuracy(true_score: torch.Tensor, false_score: torch.Tensor) -> float:
    """Accuracy (%) over pairs: how often the true caption scores above its swapped twin (each
    pair's image-text similarity or match probability). Ties count as misses."""
    return 100.0 * (true_score > false_score).float().mean().item()


@torch.no_grad()
def probe(model: Recipe, dataset: CaptionDataset, skipped: list[Skipped] | None = None) -> dict[str, float]:
    """Swap-probe accuracy overall and per swap kind (attribute / relation), scoring captions by
    ITC similarity and, for recipes with an ITM head, also by ITM match probability (`itm_*`).
    Images that do not decode are appended to `skipped`."""
    image_emb, kept, lost = embed_images(model, dataset)
    record_skips(skipped, lost)
    pairs = [(row, swap) for row, index in enumerate(kept) for swap in dataset.meta(index).get("swaps", [])]
    if not pairs:
        return {}
    owner = torch.tensor([row for row, _ in pairs])
    true, false = [swap["true"] for _, swap in pairs], [swap["false"] for _, swap in pairs]
    images, pairwise = image_emb[owner], paired(model.embedding_similarity)
    scores = {"": (pairwise(images, embed_texts(model, true)), pairwise(images, embed_texts(model, false)))}
    if model.has_itm():
        itm = itm_scorer(model, dataset, kept, true + false)
        scores["itm_"] = itm(owner.repeat(2), torch.arange(2 * len(pairs))).chunk(2)  # true, then false
    kinds = [swap["kind"] for _, swap in pairs]
    results = {}
    for prefix, (true_score, false_score) in scores.items():
        results[f"{prefix}accuracy"] = swap_probe_accuracy(true_score, false_score)
        for kind in sorted(set(kinds)):
            select = torch.tensor([k == kind for k in kinds])
            results[f"{prefix}{kind}_accuracy"] = swap_probe_accuracy(true_score[select], false_score[select])
    return results
