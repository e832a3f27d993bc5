"""Embedding and ITM scoring for evaluation and applications: a model's normalised image and
text embeddings over a data set or a list of texts, and its ITM match probability of
(image, text) pairs, in bounded batches on the model's device."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from PIL import Image

from vlp.data.formats import CaptionDataset
from vlp.data.sample import Skipped
from vlp.data.transforms import model_images
from vlp.models.recipe import Recipe


def paired(
    similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], block: int = 256
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Row i of the images against row i of the texts, for any image-text `similarity`."""

    def scores(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [similarity(images[i : i + block], texts[i : i + block]).diagonal() for i in range(0, len(images), block)]
        )

    return scores


def batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def tokenize_texts(model: Recipe, texts: list[str]) -> dict[str, torch.Tensor]:
    """`texts` encoded by the model's own tokenizer at its text context length."""
    return model.tokenizer(texts, max_length=model.text_config().context_length, style=model.tokenizer_style)


def embed_texts(model: Recipe, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Normalised text embeddings of a list of strings, with the model's own tokenizer."""
    device = next(model.parameters()).device
    parts = []
    for chunk in batches(texts, batch_size):
        tokens = tokenize_texts(model, chunk)
        parts.append(model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).cpu())
    return torch.cat(parts)


def image_batches(
    model: Recipe, dataset: CaptionDataset, skipped: list[Skipped], batch_size: int = 256
) -> Iterable[tuple[list[int], torch.Tensor]]:
    """(indices, eval-transformed images on the model's device) of the readable samples;
    unreadable ones are appended to `skipped`."""
    for chunk in batches(list(range(len(dataset))), batch_size):
        kept, images = [], []
        for index in chunk:
            item = dataset[index]
            if isinstance(item, Skipped):
                skipped.append(item)
                continue
            kept.append(index)
            images.append(item.image)
        if images:
            yield kept, model_images(model, images)


@torch.no_grad()
def embed_images(
    model: Recipe, dataset: CaptionDataset, batch_size: int = 256
) -> tuple[torch.Tensor, list[int], list[Skipped]]:
    """Normalised image embeddings of a data set; returns (embeddings, kept indices, skipped)."""
    kept, skipped, parts = [], [], []
    for indices, images in image_batches(model, dataset, skipped, batch_size):
        kept += indices
        parts.append(model.encode_image(images).cpu())
    return torch.cat(parts), kept, skipped


def record_skips(skipped: list[Skipped] | None, lost: list[Skipped]) -> None:
    """Append the `lost` samples to `skipped` where a caller collects them."""
    if skipped is not None:
        skipped.extend(lost)


def itm_scorer(
    model: Recipe, dataset: CaptionDataset, kept: list[int], texts: list[str], batch_size: int = 128
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """score(image_rows, text_rows): the model's ITM match probability of each (image, text) pair,
    rows indexing `kept` (the readable images of `dataset`) and `texts`.

    Pairs are scored in blocks sorted by image, and each block's images are read and encoded when
    it runs: memory is bounded by the block whatever the gallery size, and an image shortlisted by
    many queries is encoded about once (once per block it spans).
    """
    encoded = tokenize_texts(model, texts)

    def block_scores(image_rows: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
        unique, rows = image_rows.unique(return_inverse=True)
        return itm_pair_scores(
            model,
            [dataset[kept[i]].image for i in unique.tolist()],
            encoded["input_ids"][text_rows],
            encoded["attention_mask"][text_rows],
            rows,
        )

    def score(image_rows: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
        scores = torch.empty(len(image_rows))
        for block in image_rows.argsort(stable=True).split(batch_size):
            scores[block] = block_scores(image_rows[block], text_rows[block])
        return scores

    return score


@torch.no_grad()
def itm_pair_scores(
    model: Recipe,
    images: Sequence[Image.Image],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_rows: torch.Tensor,
) -> torch.Tensor:
    """The model's ITM match probability (on the CPU) of text i with `images[image_rows[i]]`
    (PIL images): each image is encoded and projected once, however many texts it pairs with."""
    device = next(model.parameters()).device
    tokens = model.itm_image_tokens(model_images(model, images))
    return model.itm_score(
        tokens, input_ids.to(device), attention_mask.to(device), image_rows=image_rows.to(device)
    ).cpu()
