"""Image-text contrastive loss (CLIP, Radford et al. 2021, Sec. 2.3, Fig. 3).

Symmetric InfoNCE over the in-batch similarity matrix. Under DDP it takes the "local loss"
form: each rank scores its own images (texts) against the texts (images) of *all* ranks,
gathered with gradient, so the loss and gradients equal a single process on the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlp.train.distributed import all_gather_with_grad, gather_sizes, rank


def itc_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy; embeddings must be L2-normalised."""
    sizes = gather_sizes(image_emb.shape[0], image_emb.device)
    all_images = all_gather_with_grad(image_emb, sizes)
    all_texts = all_gather_with_grad(text_emb, sizes)
    logits_per_image = logit_scale * image_emb @ all_texts.T
    logits_per_text = logit_scale * text_emb @ all_images.T
    offset = sum(sizes[: rank()])
    targets = torch.arange(image_emb.shape[0], device=image_emb.device) + offset
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2
