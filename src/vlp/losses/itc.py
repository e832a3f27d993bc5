"""Image-text contrastive loss (CLIP, Radford et al. 2021, Sec. 2.3, Fig. 3).

Symmetric InfoNCE over the in-batch similarity matrix (and, for ALBEF-style recipes, its momentum-
distilled form against momentum features and queues). Under DDP it takes the "local loss"
form: each rank scores its own images (texts) against the texts (images) of *all* ranks,
gathered with gradient, so the loss and gradients equal a single process on the global batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vlp.distributed import all_gather_with_grad, gather_sizes, rank
from vlp.losses.momentum import soft_itc_targets


def dot_similarity(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """[I, D] x [T, D] -> [I, T] cosine similarities of normalised embeddings."""
    return image_emb @ text_emb.T


def max_query_similarity(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """[I, Q, D] x [T, D] -> [I, T]: the best of an image's Q query embeddings for each text
    (BLIP-2 Sec. 3.2, ITC: "select the highest one as the image-text similarity")."""
    return torch.einsum("iqd,td->itq", image_emb, text_emb).amax(dim=-1)


def itc_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = dot_similarity,
) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy; embeddings must be L2-normalised.
    `similarity(images, texts) -> [I, T]` scores them (BLIP-2: the best query)."""
    sizes = gather_sizes(image_emb.shape[0], image_emb.device)
    all_images = all_gather_with_grad(image_emb, sizes)
    all_texts = all_gather_with_grad(text_emb, sizes)
    logits_per_image = logit_scale * similarity(image_emb, all_texts)
    logits_per_text = logit_scale * similarity(all_images, text_emb).T
    offset = sum(sizes[: rank()])
    targets = torch.arange(image_emb.shape[0], device=image_emb.device) + offset
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j targets[i, j] log softmax(logits)[i, j]."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def momentum_itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_keys: torch.Tensor,
    text_keys: torch.Tensor,
    logit_scale: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """ITC with momentum distillation (ALBEF Sec. 3.3, eq. 5-6).

    Online features [B, D] are scored against momentum keys (the momentum features of the batch
    first, then any queued ones); the targets mix the one-hot positives with the momentum
    model's own softmax over the same keys: alpha * q^m + (1 - alpha) * y.
    """
    batch = image_feat.shape[0]
    with torch.no_grad():
        positive = torch.zeros(batch, text_keys.shape[0], dtype=torch.bool, device=image_feat.device)
        positive[:, :batch] = torch.eye(batch, dtype=torch.bool, device=image_feat.device)
        i2t_targets = soft_itc_targets(logit_scale * image_feat_m @ text_keys.T, positive, alpha)
        t2i_targets = soft_itc_targets(logit_scale * text_feat_m @ image_keys.T, positive, alpha)
    i2t = soft_cross_entropy(logit_scale * image_feat @ text_keys.T, i2t_targets)
    t2i = soft_cross_entropy(logit_scale * text_feat @ image_keys.T, t2i_targets)
    return (i2t + t2i) / 2
