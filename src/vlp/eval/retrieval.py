"""Image-text retrieval Recall@K in both directions (DESIGN.md "Evaluation protocols").

Similarities are computed one block of queries at a time, keeping only each query's top-K, so
memory is O(block x gallery) rather than O(N x M): 100k+ items fit.
"""

from __future__ import annotations

import torch


def blockwise_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int,
                   block: int = 1024) -> torch.Tensor:
    """Indices [Q, k] of each query's k most similar gallery items (dot product), best first."""
    k = min(k, gallery.shape[0])
    return torch.cat([(queries[i:i + block] @ gallery.T).topk(k, dim=1).indices
                      for i in range(0, queries.shape[0], block)])


def recall_at_k(image_emb: torch.Tensor, text_emb: torch.Tensor, text_image: torch.Tensor,
                ks: tuple[int, ...] = (1, 5, 10), block: int = 1024) -> dict[str, float]:
    """R@K (in %) for image->text (a hit is any caption of the image) and text->image.

    `text_image[j]` is the index of the image that text j describes.
    """
    kmax = max(ks)
    image_ids = torch.arange(image_emb.shape[0])
    i2t = text_image[blockwise_topk(image_emb, text_emb, kmax, block)] == image_ids[:, None]
    t2i = blockwise_topk(text_emb, image_emb, kmax, block) == text_image[:, None]
    metrics = {}
    for direction, hits in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            metrics[f"{direction}_R@{k}"] = 100.0 * hits[:, :k].any(dim=1).float().mean().item()
    metrics["mean_recall"] = sum(metrics.values()) / len(metrics)
    return metrics
