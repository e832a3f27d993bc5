"""Output heads shared by the recipes: token prediction (MLM and LM), image-text matching,
attentional pooling (CoCa's and SigLIP's MAP) and the contrastive temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlp.nn.attention import Attention
from vlp.nn.transformer import ACTIVATIONS, MLP, init_weights


class TokenPredictionHead(nn.Module):
    """BERT's prediction head (Devlin et al. 2019, App. A): dense, activation, LayerNorm, then
    vocabulary logits whose weights are tied to the token embedding (used for MLM and for the
    captioning decoders of BLIP)."""

    def __init__(self, width: int, embedding: nn.Embedding, act: str = "gelu", eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = ACTIVATIONS[act]()
        self.norm = nn.LayerNorm(width, eps=eps)
        self.decoder = nn.Linear(width, embedding.num_embeddings)
        self.apply(init_weights)
        self.decoder.weight = embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(x))))


def log_temperature(init_temperature: float) -> nn.Parameter:
    """The learnable contrastive temperature, stored as the log of the logit scale 1/T (CLIP,
    Radford et al. 2021, Sec. 2.5: T initialised to 0.07, learned in log space so that it stays
    positive). A recipe keeps it as its own `logit_scale` attribute: that name is the
    state-dict key transformers and open_clip checkpoints use."""
    return nn.Parameter(torch.tensor(math.log(1 / init_temperature)))


def clamped_scale(logit_scale: torch.Tensor, max_logit_scale: float) -> torch.Tensor:
    """exp(`logit_scale`) clamped at `max_logit_scale`, so that training cannot sharpen the
    softmax without bound (CLIP Sec. 2.5 clamps at 100; ALBEF clamps the temperature at 0.001,
    a scale of 1000)."""
    return logit_scale.exp().clamp(max=max_logit_scale)


def itm_head(width: int) -> nn.Linear:
    """Two-way classifier (match / no match) on the fused [CLS]/[ENC] token (ALBEF Sec. 3.2)."""
    head = nn.Linear(width, 2)
    init_weights(head)
    return head


class AttentionalPooler(nn.Module):
    """Task-specific attentional pooling (CoCa, Yu et al. 2022, Sec. 3.2): `num_queries` learned
    queries cross-attend to an encoder's tokens (1 for a contrastive embedding, many for a
    captioning decoder)."""

    def __init__(self, width: int, context_dim: int, heads: int, num_queries: int, eps: float = 1e-5):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, num_queries, width) * width**-0.5)
        self.norm_context = nn.LayerNorm(context_dim, eps=eps)
        self.attn = Attention(width, heads, context_dim=context_dim)
        self.norm = nn.LayerNorm(width, eps=eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, context_dim] -> pooled [B, num_queries, width]."""
        queries = self.queries.expand(tokens.shape[0], -1, -1)
        return self.norm(self.attn(queries, context=self.norm_context(tokens)))


class MAPHead(nn.Module):
    """Multihead attention pooling (MAP; Zhai et al. 2022, "Scaling Vision Transformers", Sec.
    3.3; used by SigLIP's image tower): one learned probe attends to the tokens, then a pre-LN MLP
    with a residual; the probe's output is the pooled embedding.

    The attention keeps one fused [q; k; v] input projection, as `nn.MultiheadAttention` does in
    transformers' `SiglipMultiheadAttentionPoolingHead` (timm splits it into q and kv): the probe
    is projected by its first third, the tokens by the other two.
    """

    def __init__(self, width: int, heads: int, mlp_dim: int, act: str = "gelu", eps: float = 1e-6):
        super().__init__()
        if width % heads:
            raise ValueError(f"MAP width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.probe = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_dim, act)
        self.apply(init_weights)
        nn.init.normal_(self.qkv.weight, std=width**-0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, width] -> pooled [B, width]."""
        batch, width = tokens.shape[0], tokens.shape[-1]
        w_q, w_kv = self.qkv.weight.split([width, 2 * width])
        b_q, b_kv = self.qkv.bias.split([width, 2 * width])
        q = F.linear(self.probe, w_q, b_q).expand(batch, -1, -1)  # [B, 1, width]
        k, v = F.linear(tokens, w_kv, b_kv).chunk(2, dim=-1)  # [B, N, width] each

        def split(x: torch.Tensor) -> torch.Tensor:  # [B, L, width] -> [B, heads, L, width / heads]
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        x = self.out(F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2))
        x = x + self.mlp(self.norm(x))  # [B, 1, width]
        return x[:, 0]
