"""CLIP (Radford et al. 2021): two towers trained with a symmetric contrastive loss.

Sec. 2.5: a learnable temperature initialised to 0.07 and parameterised as a log-scale,
clamped so that the logit scale never exceeds 100. Sec. 2.4: the image tower is a ViT or a
modified ResNet (`vision.kind`, `vlp.nn.resnet.image_tower`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from vlp.losses.itc import itc_loss
from vlp.models.recipe import Recipe
from vlp.models.registry import register
from vlp.nn.heads import clamped_scale, log_temperature
from vlp.nn.resnet import image_projection, image_tower
from vlp.nn.text import TextConfig, TextTransformer
from vlp.nn.vit import VisionConfig

if TYPE_CHECKING:
    from vlp.config import RunConfig
    from vlp.data.tokenizer import Tokenizer


@dataclass
class CLIPConfig:
    embed_dim: int = 128
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0


@register("clip", CLIPConfig)
class CLIP(Recipe):
    tokenizer_style = "clip"  # <|startoftext|> ... <|endoftext|>, EOS pooling
    eval_tasks = ("zeroshot", "retrieval", "probe")

    def __init__(self, cfg: CLIPConfig, tokenizer: Tokenizer | None = None, run_config: RunConfig | None = None):
        super().__init__(cfg, tokenizer, run_config)
        self.visual = image_tower(cfg.vision, cfg.embed_dim)
        self.text = TextTransformer(cfg.text)
        self.image_proj = image_projection(cfg.vision, cfg.embed_dim)  # Identity after a ResNet's attention pool
        self.text_proj = nn.Linear(cfg.text.width, cfg.embed_dim, bias=False)
        for proj, width in ((self.image_proj, cfg.vision.width), (self.text_proj, cfg.text.width)):
            if isinstance(proj, nn.Linear):
                nn.init.normal_(proj.weight, std=width**-0.5)
        self.logit_scale = log_temperature(cfg.init_temperature)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        emb = self.image_proj(self.visual(images)[0])
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        emb = self.text_proj(self.text(input_ids, attention_mask)[0])
        return F.normalize(emb, dim=-1) if normalize else emb

    def scale(self) -> torch.Tensor:
        """exp(log-scale) clamped at `max_logit_scale`."""
        return clamped_scale(self.logit_scale, self.cfg.max_logit_scale)

    pair_loss_only = True

    def pair_losses(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"itc": itc_loss(image_emb, text_emb, self.scale())}

    def similarity(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Image-text logits from normalised embeddings, as used in zero-shot and probes."""
        return self.scale() * image_emb @ text_emb.T
