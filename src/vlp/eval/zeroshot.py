"""Zero-shot classification with prompt ensembles (CLIP, Radford et al. 2021, Sec. 3.1.4).

Every class name is put into every prompt template; a class's text embedding is the mean of its
prompts' (Sec. 3.1.4: ensembling over templates beats any single one). An image's prediction is
the class whose embedding scores highest under the recipe's `similarity`. The metrics are those
LAION's CLIP_benchmark reports: top-1 and top-5 accuracy and the mean per-class recall (balanced
accuracy), which an imbalanced test set cannot inflate by favouring its largest class.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vlp.data.formats import CaptionDataset
from vlp.data.sample import Skipped
from vlp.eval.encode import embed_images, embed_texts, record_skips
from vlp.losses.itc import dot_similarity
from vlp.models.recipe import Recipe

Similarity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Used when a data set brings no templates of its own: generic photo prompts, written for vlp.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of the {}.",
    "an image showing a {}.",
    "a close-up photo of the {}.",
    "a cropped photo of a {}.",
    "a low-resolution picture of a {}.",
    "a drawing of a {}.",
    "there is a {} in this photo.",
)


def class_embeddings(
    embed_texts: Callable[[list[str]], torch.Tensor],
    class_names: list[str],
    templates: list[str] | tuple[str, ...] | None = None,
) -> torch.Tensor:
    """[C, D]: per class, the mean of its normalised prompt embeddings, renormalised.

    `templates` hold one `{}` placeholder each; none or an empty list means `DEFAULT_TEMPLATES`.
    """
    templates = list(templates or DEFAULT_TEMPLATES)
    prompts = [template.format(name) for name in class_names for template in templates]
    emb = F.normalize(embed_texts(prompts), dim=-1).view(len(class_names), len(templates), -1)  # [C, T, D]
    return F.normalize(emb.mean(dim=1), dim=-1)  # [C, D]


def zeroshot_accuracy(
    image_emb: torch.Tensor,
    labels: torch.Tensor,
    class_emb: torch.Tensor,
    similarity: Similarity = dot_similarity,
) -> float:
    """Top-1 accuracy (%) of the nearest class embedding (`similarity(images, classes)`)."""
    return _top_k_hits(similarity(image_emb, class_emb), labels, 1).float().mean().item() * 100.0


def zeroshot_metrics(
    image_emb: torch.Tensor,
    labels: torch.Tensor,
    class_emb: torch.Tensor,
    similarity: Similarity = dot_similarity,
) -> dict[str, float]:
    """{"top1", "top5", "mean_per_class_recall"} in %, for images [N, ...] with class ids [N].

    top5 counts an image right when its class is among the min(5, C) best scoring. The mean
    per-class recall averages, over the classes present in `labels`, the fraction of each
    class's images whose top-1 prediction is right; a class with no image does not count (its
    recall is undefined), but still competes as a prediction. With no image, every value is NaN.
    """
    scores = similarity(image_emb, class_emb)  # [N, C]
    top1 = _top_k_hits(scores, labels, 1)
    return {
        "top1": 100.0 * top1.float().mean().item(),
        "top5": 100.0 * _top_k_hits(scores, labels, 5).float().mean().item(),
        "mean_per_class_recall": _mean_per_class_recall(top1, labels, scores.shape[1]),
    }


def _top_k_hits(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """[N] bool: whether each row's label is among its min(k, C) highest scores."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # [N, k]
    return (top == labels.to(top.device)[:, None]).any(dim=1)


def _mean_per_class_recall(hits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    labels = labels.to(hits.device)
    count = torch.bincount(labels, minlength=num_classes)  # [C] images per class
    right = torch.bincount(labels[hits], minlength=num_classes)  # [C] of them predicted right
    present = count > 0
    return 100.0 * (right[present].float() / count[present]).mean().item()


@torch.no_grad()
def zeroshot(
    model: Recipe,
    dataset: CaptionDataset,
    label_sets: dict[str, tuple[list[int], list[str]]],
    templates: list[str] | None = None,
    skipped: list[Skipped] | None = None,
) -> dict[str, float]:
    """Zero-shot classification of `dataset`'s images, once per label set: {name: (class id of
    each item, class names)}; metrics as `zeroshot_metrics`, prefixed "name_" (none for the
    name ""). The images are embedded once; those that do not decode go to `skipped`."""
    image_emb, kept, lost = embed_images(model, dataset)
    record_skips(skipped, lost)
    results: dict[str, float] = {}
    for name, (labels, classes) in label_sets.items():
        class_emb = class_embeddings(lambda texts: embed_texts(model, texts), classes, templates)
        metrics = zeroshot_metrics(
            image_emb, torch.tensor([labels[i] for i in kept]), class_emb, model.embedding_similarity
        )
        results.update({f"{name}_{key}" if name else key: value for key, value in metrics.items()})
    return results
