"""SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"): CLIP's two towers
trained with a pairwise sigmoid loss instead of the softmax (Sec. 3.2, `vlp.losses.sigmoid`).

What differs from CLIP is configuration of the shared towers and two small parts:
- the image tower has no class token and no `ln_pre`, its patch embedding has a bias, and it
  pools with a multihead-attention probe (MAP, `vlp.nn.heads.MAPHead`); its pooled output is the
  image embedding (no projection);
- the text tower is bidirectional, sees every caption padded to the context length (big_vision
  trains so, with no padding mask) and pools the final position, projected by a linear layer
  with a bias;
- besides the learned temperature t = exp(t'), a learned logit bias b; t' = log 10 and b = -10
  at initialisation (Sec. 3.2), so that the loss starts near its optimum for the many negatives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from vlp.losses.sigmoid import INIT_LOGIT_BIAS, INIT_LOGIT_SCALE, sigmoid_loss
from vlp.models.recipe import Recipe
from vlp.models.registry import register
from vlp.nn.heads import clamped_scale
from vlp.nn.text import TextConfig, TextTransformer
from vlp.nn.vit import VisionConfig, VisionTransformer

if TYPE_CHECKING:
    from vlp.config import RunConfig
    from vlp.data.tokenizer import Tokenizer


def siglip_vision_config(**overrides) -> VisionConfig:
    """SigLIP's image tower: patches only, MAP pooling, no `ln_pre`, a patch bias, tanh GELU, eps 1e-6."""
    defaults = dict(class_token=False, pool="map", ln_pre=False, patch_bias=True, act="gelu_tanh", eps=1e-6)
    return VisionConfig(**{**defaults, **overrides})


def siglip_text_config(**overrides) -> TextConfig:
    """SigLIP's text tower: pre-LN, bidirectional, pooling the last position, tanh GELU, eps 1e-6."""
    defaults = dict(causal=False, pool="last", act="gelu_tanh", eps=1e-6)
    return TextConfig(**{**defaults, **overrides})


@dataclass
class SigLIPConfig:
    embed_dim: int = 128  # the image tower's width unless `image_proj`
    vision: VisionConfig = field(default_factory=lambda: siglip_vision_config(width=128))
    text: TextConfig = field(default_factory=siglip_text_config)
    image_proj: bool = False  # a linear map of the pooled image features (SigLIP has none)
    init_logit_scale: float = INIT_LOGIT_SCALE  # t' (t = exp(t') = 10)
    init_logit_bias: float = INIT_LOGIT_BIAS  # b
    max_logit_scale: float = 100.0  # t is clamped here (never reached in practice)
    tokens: dict[str, int] = field(default_factory=dict)  # special ids, filled from the tokenizer (pad)


@register("siglip", SigLIPConfig)
class SigLIP(Recipe):
    tokenizer_style = "clip"  # <|startoftext|> ... <|endoftext|>, padded to the context length
    eval_tasks = ("zeroshot", "retrieval", "probe")

    def __init__(self, cfg: SigLIPConfig, tokenizer: Tokenizer | None = None, run_config: RunConfig | None = None):
        super().__init__(cfg, tokenizer, run_config)
        if cfg.text.pool != "last" or cfg.text.causal:
            raise ValueError(
                "SigLIP's text tower is bidirectional and pools the last position: a model.text section "
                "replaces the default whole, so it needs causal: false, pool: last (see configs/siglip/tiny.yaml)"
            )
        if not cfg.image_proj and cfg.embed_dim != cfg.vision.width:
            raise ValueError(f"embed_dim {cfg.embed_dim} must equal vision.width {cfg.vision.width} without image_proj")
        self.visual = VisionTransformer(cfg.vision)
        self.text = TextTransformer(cfg.text)
        self.image_proj = nn.Linear(cfg.vision.width, cfg.embed_dim) if cfg.image_proj else nn.Identity()
        self.text_proj = nn.Linear(cfg.text.width, cfg.embed_dim)
        nn.init.normal_(self.text_proj.weight, std=cfg.text.width**-0.5)
        nn.init.zeros_(self.text_proj.bias)
        if cfg.image_proj:
            nn.init.normal_(self.image_proj.weight, std=cfg.vision.width**-0.5)
            nn.init.zeros_(self.image_proj.bias)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_logit_bias)))

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        emb = self.image_proj(self.visual(images)[0])
        return F.normalize(emb, dim=-1) if normalize else emb

    def padded_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] -> [B, context_length]: every position past a caption holds the pad
        id, so that the pooled last position does not depend on how the batch was padded."""
        pad = self.cfg.tokens.get("pad", self.cfg.tokens.get("eot", 0))
        ids = input_ids.masked_fill(attention_mask == 0, pad)
        return F.pad(ids, (0, self.cfg.text.context_length - ids.shape[1]), value=pad)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        ids = self.padded_ids(input_ids, attention_mask)
        emb = self.text_proj(self.text(ids, torch.ones_like(ids))[0])  # no padding mask, as trained
        return F.normalize(emb, dim=-1) if normalize else emb

    def scale(self) -> torch.Tensor:
        """t = exp(t'), clamped at `max_logit_scale`."""
        return clamped_scale(self.logit_scale, self.cfg.max_logit_scale)

    pair_loss_only = True

    def pair_losses(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sigmoid": sigmoid_loss(image_emb, text_emb, self.scale(), self.logit_bias)}

    def label_probabilities(self, image_emb: torch.Tensor, label_emb: torch.Tensor) -> torch.Tensor:
        """sigmoid(t x.y + b) per label: SigLIP scores each pair on its own (Sec. 3), so the
        labels' probabilities need not sum to one."""
        return torch.sigmoid(self.similarity(image_emb, label_emb))

    def similarity(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Image-text logits t * x.y + b; their sigmoid is the probability that a pair matches."""
        return self.scale() * image_emb @ text_emb.T + self.logit_bias
