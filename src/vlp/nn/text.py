"""Text transformer tower: bidirectional (BERT-style, CLS pooling) or causal (CLIP, EOS pooling).

Fusion encoders and decoders (ALBEF, BLIP) add cross-attention to image tokens through
`cross_attention_every`/`cross_attention_from`; a run can cover a slice of the layers (ALBEF's
text half, then its fusion half) and decode step by step with a `KVCache`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlp.nn.attention import KVCache, padding_mask
from vlp.nn.transformer import Transformer, TransformerConfig, init_weights


@dataclass
class TextConfig(TransformerConfig):
    vocab_size: int = 4096
    context_length: int = 32
    causal: bool = True
    pool: str = "eos"  # eos: last real token (CLIP) | cls: first token (BERT) | last: last position (SigLIP)
    embed_norm: bool = False  # LayerNorm on the embeddings (BERT)


def bert_text_config(**overrides) -> TextConfig:
    """A BERT-style text tower: post-LN, bidirectional, [CLS] pooling, embedding LayerNorm."""
    defaults = dict(causal=False, pool="cls", pre_norm=False, embed_norm=True, eps=1e-12)
    return TextConfig(**{**defaults, **overrides})


def eos_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row of a right-padded batch."""
    return attention_mask.sum(dim=1) - 1


class TextTransformer(nn.Module):
    """Token + learned position embeddings -> transformer -> pooled, tokens.

    Pre-LN stacks end with a LayerNorm (CLIP); post-LN stacks (BERT) already end normalised.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.pool not in ("eos", "cls", "last"):
            raise ValueError(f"text pool must be 'eos', 'cls' or 'last', got {cfg.pool!r}")
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.context_length, cfg.width))
        self.embed_norm = nn.LayerNorm(cfg.width, eps=cfg.eps) if cfg.embed_norm else nn.Identity()
        self.transformer = Transformer(cfg)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.eps) if cfg.pre_norm else nn.Identity()
        init_weights(self.token_embed)
        nn.init.normal_(self.pos_embed, std=0.01)

    def embed(self, input_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Token + position embeddings of tokens at positions offset, offset + 1, ..."""
        end = offset + input_ids.shape[1]
        if end > self.cfg.context_length:
            raise ValueError(f"text length {end} exceeds context_length {self.cfg.context_length}")
        return self.embed_norm(self.token_embed(input_ids) + self.pos_embed[:, offset:end])

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        *,
        hidden: torch.Tensor | None = None,
        layers: slice = slice(None),
        cache: KVCache | None = None,
        context_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask [B, L] (right-padded) -> (pooled [B, width], tokens).

        `hidden` continues from the output of earlier layers instead of embedding `input_ids`;
        `layers` picks the blocks to run (the final norm applies when the last one runs);
        `cache` decodes incrementally (causal towers): pass only the new tokens;
        `context_rows` pairs text i with context row `context_rows[i]` (see `Attention`).
        """
        offset = cache.length if cache is not None else 0
        x = self.embed(input_ids, offset) if hidden is None else hidden
        if self.cfg.causal:
            # Right padding: a causal row never sees the pads after it, so no padding mask needed.
            x = self.transformer(
                x,
                is_causal=True,
                context=context,
                context_mask=context_mask,
                cache=cache,
                layers=layers,
                context_rows=context_rows,
            )
        else:
            x = self.transformer(
                x,
                mask=padding_mask(attention_mask),
                context=context,
                context_mask=context_mask,
                cache=cache,
                layers=layers,
                context_rows=context_rows,
            )
        if cache is not None:
            cache.advance(input_ids.shape[1])
        if layers.indices(self.cfg.layers)[1] == self.cfg.layers:
            x = self.norm(x)
        if self.cfg.pool == "cls":
            return x[:, 0], x
        if self.cfg.pool == "last":  # SigLIP: texts padded to the context length, the final position
            return x[:, -1], x
        rows = torch.arange(x.shape[0], device=x.device)
        return x[rows, eos_positions(attention_mask)], x


def tie_except_self_attention(encoder: TextTransformer, decoder: TextTransformer) -> None:
    """Make `decoder` share every module of `encoder` except its self-attention (and that
    sub-layer's LayerNorm): BLIP's MED, Sec. 3.1 ("the encoder and decoder share all parameters
    except for the SA layers"). Both must have the same shape and cross-attention layout."""
    if len(encoder.transformer.blocks) != len(decoder.transformer.blocks):
        raise ValueError("encoder and decoder must have the same number of layers to share weights")
    decoder.token_embed, decoder.pos_embed = encoder.token_embed, encoder.pos_embed
    decoder.embed_norm, decoder.norm = encoder.embed_norm, encoder.norm
    for enc, dec in zip(encoder.transformer.blocks, decoder.transformer.blocks):
        if (enc.cross_attn is None) != (dec.cross_attn is None):
            raise ValueError("encoder and decoder differ in where they cross-attend")
        dec.mlp, dec.norm2 = enc.mlp, enc.norm2
        if enc.cross_attn is not None:
            dec.cross_attn, dec.norm_cross = enc.cross_attn, enc.norm_cross
