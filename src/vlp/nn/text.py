"""Text transformer tower: bidirectional (BERT-style, CLS pooling) or causal (CLIP, EOS pooling).

Later recipes add cross-attention to image tokens through `cross_attention_every`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlp.nn.attention import padding_mask
from vlp.nn.transformer import Transformer, TransformerConfig, init_weights


@dataclass
class TextConfig(TransformerConfig):
    vocab_size: int = 4096
    context_length: int = 32
    causal: bool = True
    pool: str = "eos"  # eos: last real token (CLIP) | cls: first token (BERT)


def eos_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row of a right-padded batch."""
    return attention_mask.sum(dim=1) - 1


class TextTransformer(nn.Module):
    """Token + learned position embeddings -> transformer -> final LayerNorm -> pooled, tokens."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.pool not in ("eos", "cls"):
            raise ValueError(f"text pool must be 'eos' or 'cls', got {cfg.pool!r}")
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        init_weights(self.token_embed)
        nn.init.normal_(self.pos_embed, std=0.01)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask [B, L] (right-padded) -> (pooled [B, width], tokens)."""
        length = input_ids.shape[1]
        if length > self.cfg.context_length:
            raise ValueError(f"text length {length} exceeds context_length {self.cfg.context_length}")
        x = self.token_embed(input_ids) + self.pos_embed[:, :length]
        if self.cfg.causal:
            # Right padding: a causal row never sees the pads after it, so no padding mask needed.
            x = self.transformer(x, is_causal=True, context=context)
        else:
            x = self.transformer(x, mask=padding_mask(attention_mask), context=context)
        x = self.norm(x)
        if self.cfg.pool == "cls":
            return x[:, 0], x
        rows = torch.arange(x.shape[0], device=x.device)
        return x[rows, eos_positions(attention_mask)], x
