"""Image-text retrieval Recall@K in both directions (docs/design.md, "Evaluation protocols").

Similarities are computed one tile (a block of queries x a block of the gallery) at a time,
keeping only each query's running top-K, so memory is O(block x gallery block) beyond the
embeddings, never O(N x M): millions of items fit. Recipes with an ITM head
re-rank each query's ITC shortlist by their match score (`reranked_recall_at_k`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from vlp.data.formats import CaptionDataset
from vlp.data.sample import Skipped
from vlp.eval.encode import embed_images, embed_texts, itm_scorer, record_skips
from vlp.losses.itc import dot_similarity
from vlp.models.recipe import Recipe

Similarity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def blockwise_topk(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    block: int = 1024,
    similarity: Similarity = dot_similarity,
    gallery_block: int = 65536,
) -> torch.Tensor:
    """Indices [Q, k] of each query's k most similar gallery items, best first;
    `similarity(query_block, gallery_block) -> [q, g]` (default: dot product). Scores exist one
    (block x gallery_block) tile at a time, each query keeping a running top-k, so memory does
    not grow with the gallery beyond the embeddings themselves."""
    k = min(k, gallery.shape[0])
    return torch.cat(
        [
            _tile_topk(queries[i : i + block], gallery, k, similarity, gallery_block)
            for i in range(0, queries.shape[0], block)
        ]
    )


def _tile_topk(
    queries: torch.Tensor, gallery: torch.Tensor, k: int, similarity: Similarity, gallery_block: int
) -> torch.Tensor:
    values = indices = None
    for start in range(0, gallery.shape[0], gallery_block):
        scores = similarity(queries, gallery[start : start + gallery_block])
        top = scores.topk(min(k, scores.shape[1]), dim=1)
        tile_values, tile_indices = top.values, top.indices + start
        if values is not None:  # merge with the best so far
            tile_values, tile_indices = torch.cat([values, tile_values], 1), torch.cat([indices, tile_indices], 1)
        best = tile_values.topk(min(k, tile_values.shape[1]), dim=1)
        values, indices = best.values, tile_indices.gather(1, best.indices)
    return indices


def directed(similarity: Similarity) -> tuple[Similarity, Similarity]:
    """(image->text, text->image) query-vs-gallery scores of an image-text `similarity`."""
    return similarity, lambda texts, images: similarity(images, texts).T


def recall_at_k(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_image: torch.Tensor,
    ks: tuple[int, ...] = (1, 5, 10),
    block: int = 1024,
    similarity: Similarity = dot_similarity,
) -> dict[str, float]:
    """R@K (in %) for image->text (a hit is any caption of the image) and text->image.

    `text_image[j]` is the index of the image that text j describes; `similarity(images, texts)`
    scores embeddings (BLIP-2: the best of an image's query embeddings).
    """
    kmax = max(ks)
    image_ids = torch.arange(image_emb.shape[0])
    i2t_sim, t2i_sim = directed(similarity)
    i2t = text_image[blockwise_topk(image_emb, text_emb, kmax, block, i2t_sim)] == image_ids[:, None]
    t2i = blockwise_topk(text_emb, image_emb, kmax, block, t2i_sim) == text_image[:, None]
    metrics = {}
    for direction, hits in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            metrics[f"{direction}_R@{k}"] = 100.0 * hits[:, :k].any(dim=1).float().mean().item()
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    return metrics


def reranked_recall_at_k(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_image: torch.Tensor,
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    k_test: int = 16,
    ks: tuple[int, ...] = (1, 5, 10),
    block: int = 1024,
    similarity: Similarity = dot_similarity,
) -> dict[str, float]:
    """R@K after re-ranking each query's ITC top-`k_test` by `score(image_idx, text_idx)` (an ITM
    match score per pair), as ALBEF/BLIP evaluate retrieval; items outside the shortlist keep
    their ITC order after it. Cost: k_test fusion passes per query, in both directions.
    """
    image_ids, shortlist = torch.arange(image_emb.shape[0]), max(k_test, max(ks))
    i2t_sim, t2i_sim = directed(similarity)
    i2t = rerank(blockwise_topk(image_emb, text_emb, shortlist, block, i2t_sim), k_test, lambda q, c: score(q, c))
    t2i = rerank(blockwise_topk(text_emb, image_emb, shortlist, block, t2i_sim), k_test, lambda q, c: score(c, q))
    hits = {"i2t": text_image[i2t] == image_ids[:, None], "t2i": t2i == text_image[:, None]}
    metrics = {
        f"{direction}_R@{k}": 100.0 * h[:, :k].any(dim=1).float().mean().item()
        for direction, h in hits.items()
        for k in ks
    }
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    return metrics


def rerank(top: torch.Tensor, k_test: int, score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Reorder the first k_test columns of each row of `top` by score(query, candidate)."""
    k_test = min(k_test, top.shape[1])
    queries = torch.arange(top.shape[0]).repeat_interleave(k_test)
    scores = score(queries, top[:, :k_test].reshape(-1)).view(-1, k_test)
    order = scores.argsort(dim=1, descending=True, stable=True)
    return torch.cat([top[:, :k_test].gather(1, order), top[:, k_test:]], dim=1)


def texts_of(dataset: CaptionDataset, kept: list[int]) -> tuple[list[str], torch.Tensor]:
    """Every caption of the `kept` items and, for each, its item's row in `kept`."""
    texts, owner = [], []
    for row, index in enumerate(kept):
        captions = dataset.captions(index)
        texts += captions
        owner += [row] * len(captions)
    return texts, torch.tensor(owner)


def retrieval(
    model: Recipe, dataset: CaptionDataset, examples: int = 0, k_test: int = 0, skipped: list[Skipped] | None = None
) -> tuple[dict, dict | None, list]:
    """Recall@1/5/10 both ways; with `k_test` and a recipe with an ITM head, also the recalls
    after ITM re-ranking of each query's ITC top-k_test; optionally the top-5 captions of the
    first `examples` images. Returns (ITC metrics, re-ranked metrics or None, examples); images
    that do not decode are appended to `skipped`."""
    start = time.perf_counter()
    image_emb, kept, lost = embed_images(model, dataset)
    record_skips(skipped, lost)
    texts, owner = texts_of(dataset, kept)
    text_emb = embed_texts(model, texts)
    metrics = recall_at_k(image_emb, text_emb, owner, similarity=model.embedding_similarity)
    metrics["seconds"] = time.perf_counter() - start
    reranked = None
    if k_test and model.has_itm():
        reranked = _itm_reranked(model, dataset, kept, image_emb, texts, owner, text_emb, k_test)
    shown = []
    if examples:
        top = blockwise_topk(image_emb[:examples], text_emb, 5, similarity=model.embedding_similarity)
        for row, indices in enumerate(top.tolist()):
            shown.append(
                {
                    "index": kept[row],
                    "truth": dataset.captions(kept[row]),
                    "top5": [{"caption": texts[j], "correct": int(owner[j]) == row} for j in indices],
                }
            )
    return metrics, reranked, shown


def _itm_reranked(
    model: Recipe,
    dataset: CaptionDataset,
    kept: list[int],
    image_emb: torch.Tensor,
    texts: list[str],
    owner: torch.Tensor,
    text_emb: torch.Tensor,
    k_test: int,
) -> dict[str, float]:
    """Recall@K with each query's ITC top-`k_test` re-ranked by the model's ITM score; reports
    the extra seconds and the number of ITM (fusion) passes it cost."""
    start = time.perf_counter()
    itm = itm_scorer(model, dataset, kept, texts)
    pairs = 0

    def score(image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
        nonlocal pairs
        pairs += len(image_idx)
        return itm(image_idx, text_idx)

    metrics = reranked_recall_at_k(image_emb, text_emb, owner, score, k_test, similarity=model.embedding_similarity)
    metrics.update(extra_seconds=time.perf_counter() - start, k_test=k_test, itm_pairs=pairs)
    return metrics
