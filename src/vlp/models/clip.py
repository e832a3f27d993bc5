"""CLIP (Radford et al. 2021): two towers trained with a symmetric contrastive loss.

Sec. 2.5: a learnable temperature initialised to 0.07 and parameterised as a log-scale,
clamped so that the logit scale never exceeds 100.
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
from vlp.nn.text import TextConfig, TextTransformer
from vlp.nn.vit import VisionConfig, VisionTransformer

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
        self.visual = VisionTransformer(cfg.vision)
        self.text = TextTransformer(cfg.text)
        self.image_proj = nn.Linear(cfg.vision.width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text.width, cfg.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=cfg.vision.width**-0.5)
        nn.init.normal_(self.text_proj.weight, std=cfg.text.width**-0.5)
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

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.pair_losses(*self.embed_pair(batch))

    def embed_pair(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(batch["images"]), self.encode_text(batch["input_ids"], batch["attention_mask"])

    def pair_losses(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"itc": itc_loss(image_emb, text_emb, self.scale())}

    def similarity(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Image-text logits from normalised embeddings, as used in zero-shot and probes."""
        return self.scale() * image_emb @ text_emb.T
