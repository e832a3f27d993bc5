"""Zero-shot classification of one's own images with labels one chooses (CLIP, Radford et al.
2021, Sec. 3.1.4): each label in every prompt template, embeddings averaged per label (a prompt
ensemble), then the recipe's label probabilities (a softmax over the scaled similarities; for
SigLIP, each label's sigmoid)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image

from vlp.apps.ability import require
from vlp.data.transforms import model_images
from vlp.eval.encode import embed_texts
from vlp.eval.zeroshot import class_embeddings
from vlp.models.recipe import Recipe
from vlp.train.precision import autocast, resolve_precision

Labelled = list[tuple[str, float]]  # (label, probability), most probable first


def classifier(
    model: Recipe,
    labels: Sequence[str],
    templates: Sequence[str] | None = None,
    top_k: int = 5,
    precision: str = "auto",
) -> Callable[[Sequence[Image.Image]], list[Labelled]]:
    """A function from a batch of PIL images to each image's `top_k` labels with their
    probabilities; the label embeddings are computed once, here (in fp32). `precision`: the
    image encoder's, fp32, bf16 autocast, or auto (bf16 where measured faster here)."""
    require(model, "classify")
    if not labels:
        raise ValueError("no labels to classify with")
    device = next(model.parameters()).device
    class_emb = class_embeddings(lambda texts: embed_texts(model, texts), list(labels), templates).to(device)
    k = min(top_k, len(labels))
    precision = resolve_precision(precision, device)

    @torch.no_grad()
    def classify_batch(images: Sequence[Image.Image]) -> list[Labelled]:
        with autocast(precision, device):
            image_emb = model.encode_image(model_images(model, images)).float()
        probs = model.label_probabilities(image_emb, class_emb).cpu()
        top = probs.topk(k, dim=-1)
        return [
            [(labels[j], p) for p, j in zip(row_p, row_j)]
            for row_p, row_j in zip(top.values.tolist(), top.indices.tolist())
        ]

    return classify_batch


def classify(
    model: Recipe,
    images: Sequence[Image.Image],
    labels: Sequence[str],
    templates: Sequence[str] | None = None,
    top_k: int = 5,
    precision: str = "auto",
) -> list[Labelled]:
    """Each image's `top_k` (label, probability) pairs, most probable first (`vlp.classify`)."""
    return classifier(model, labels, templates, top_k, precision)(images)
