"""Q-Former (BLIP-2, Li et al. 2023, Sec. 3.1): learned queries that read a frozen image encoder.

A BERT-style stack over one sequence [queries; text]. Self-attention is shared by both streams
and what each may see is set by a mask (Sec. 3.2, Fig. 2):

- "unimodal" (ITC): queries see queries, text sees text;
- "causal" (ITG): queries see queries, text sees every query and the text before it;
- "bidirectional" (ITM): everything sees everything.

Cross-attention to the image features sits in every `cross_attention_every`-th block and is
applied to the queries only; queries and text have separate feed-forward weights. Both are
configuration of the shared `Block` (`cross_attention_first_only`, `split_ffn`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlp.nn.attention import causal_mask
from vlp.nn.text import TextConfig, TextTransformer

MODES = ("unimodal", "causal", "bidirectional")


@dataclass
class QFormerConfig(TextConfig):
    num_queries: int = 32
    causal: bool = False
    pool: str = "cls"
    pre_norm: bool = False
    embed_norm: bool = True
    eps: float = 1e-12
    cross_attention_every: int = 2
    split_ffn: bool = True
    cross_attention_first_only: bool = True


def qformer_mask(num_queries: int, text_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Boolean attention mask [B, 1, Q + T, Q + T] (True: may attend) for one of `MODES`;
    `text_mask` [B, T] marks real text tokens (1) and padding (0)."""
    if mode not in MODES:
        raise ValueError(f"Q-Former mask mode must be one of {MODES}, got {mode!r}")
    batch, length = text_mask.shape
    device, total = text_mask.device, num_queries + length
    allowed = torch.ones(total, total, dtype=torch.bool, device=device)
    if mode != "bidirectional":
        allowed[:num_queries, num_queries:] = False  # queries never see the text
    if mode == "unimodal":
        allowed[num_queries:, :num_queries] = False  # nor the text the queries
    if mode == "causal":
        allowed[num_queries:, num_queries:] = causal_mask(length, device)
    keys = torch.cat([torch.ones(batch, num_queries, dtype=torch.bool, device=device), text_mask.bool()], dim=1)
    return allowed[None, None] & keys[:, None, None, :]


class QFormer(nn.Module):
    """Learned queries + a BERT text tower, run as one sequence under a `qformer_mask`."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.text = TextTransformer(cfg)  # embeddings, blocks (cross-attention on queries only)
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_queries, cfg.width) * 0.02)

    def forward(
        self,
        image_feats: torch.Tensor | None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mode: str = "unimodal",
        image_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(query outputs [B, Q, W] or None, text outputs [B, T, W] or None).

        Without `input_ids` only the queries run (reading `image_feats`); without `image_feats`
        only the text runs, which under the unimodal mask is the same as running both.
        `image_rows` [B]: sequence i reads `image_feats[image_rows[i]]` (the ITM batch).
        """
        parts, queries = [], 0
        if image_feats is not None:
            batch = image_feats.shape[0] if image_rows is None else image_rows.shape[0]
            parts.append(self.text.embed_norm(self.query_tokens.expand(batch, -1, -1)))
            queries = self.cfg.num_queries
        if input_ids is not None:
            parts.append(self.text.embed(input_ids))
        x = torch.cat(parts, dim=1)
        mask = None if input_ids is None else qformer_mask(queries, attention_mask, mode)
        x = self.text.transformer(x, mask=mask, context=image_feats, split=queries, context_rows=image_rows)
        query_out = x[:, :queries] if queries else None
        return query_out, (x[:, queries:] if input_ids is not None else None)
