"""BLIP-2 stage 1 (Li et al. 2023, Sec. 3.2): a Q-Former learns to read a frozen image encoder.

The image encoder is frozen (no gradient, never in the optimizer) and read at its penultimate
block, through a trainable LayerNorm. Three objectives share the Q-Former, each with its own
attention mask (`vlp.nn.qformer.qformer_mask`):

- ITC: every query's embedding against the text's [CLS] embedding, the best query counting
  (unimodal mask: queries and text cannot see each other);
- ITG: the text, with [DEC] in place of [CLS], generated from the queries (causal mask);
- ITM: queries and text attend to each other (bidirectional mask); the match score is the mean
  of the per-query logits; hard negatives are drawn by ITC similarity as in ALBEF.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from vlp.losses.itc import itc_loss, max_query_similarity
from vlp.losses.lm import lm_loss
from vlp.models.blip import with_first_token
from vlp.models.fusion import itm_inputs
from vlp.models.registry import register
from vlp.nn.heads import TokenPredictionHead, itm_head
from vlp.nn.qformer import QFormer, QFormerConfig
from vlp.nn.vit import VisionConfig, VisionTransformer

OBJECTIVES = ("itc", "itg", "itm")


@dataclass
class BLIP2Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    vision_layers: int = -1  # blocks of the frozen encoder to run; -1: all but the last (Sec. 3.1)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    embed_dim: int = 256
    init_temperature: float = 0.07
    hard_negatives: bool = True
    label_smoothing: float = 0.1
    objectives: tuple[str, ...] = OBJECTIVES
    tokens: dict[str, int] = field(default_factory=dict)  # special ids, filled from the tokenizer


@register("blip2_stage1", BLIP2Config)
class BLIP2Stage1(nn.Module):
    tokenizer_style = "bert"
    text_section = "qformer"  # the config section whose vocab_size follows the tokenizer
    eval_tasks = ("zeroshot", "retrieval", "probe")
    embedding_similarity = staticmethod(max_query_similarity)  # image embeddings are [B, Q, D]

    def __init__(self, cfg: BLIP2Config):
        super().__init__()
        missing = {"pad", "cls", "sep", "dec"} - set(cfg.tokens)
        if missing:
            raise ValueError(f"model.tokens lacks the ids of {sorted(missing)} (the tokenizer's)")
        if not cfg.objectives or set(cfg.objectives) - set(OBJECTIVES):
            raise ValueError(f"model.objectives must be a non-empty subset of {list(OBJECTIVES)}, "
                             f"got {list(cfg.objectives)}")
        cfg.qformer = replace(cfg.qformer, context_dim=cfg.vision.width)
        self.cfg, self.objectives = cfg, set(cfg.objectives)
        self.visual = VisionTransformer(cfg.vision).requires_grad_(False)
        self.ln_vision = nn.LayerNorm(cfg.vision.width)
        self.qformer = QFormer(cfg.qformer)
        width = cfg.qformer.width
        self.vision_proj = nn.Linear(width, cfg.embed_dim)
        self.text_proj = nn.Linear(width, cfg.embed_dim)
        self.itm_head = itm_head(width)
        self.lm_head = TokenPredictionHead(width, self.qformer.text.token_embed, cfg.qformer.act, cfg.qformer.eps)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)))
        self.has_unused_parameters = self.objectives != set(OBJECTIVES)

    def train(self, mode: bool = True) -> BLIP2Stage1:
        """The frozen image encoder stays in eval mode."""
        super().train(mode)
        self.visual.eval()
        return self

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen encoder's penultimate-block tokens, through the trainable `ln_vision`."""
        with torch.no_grad():
            tokens = self.visual(images, layers=self.cfg.vision_layers)[1]
        return self.ln_vision(tokens)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised per-query embeddings [B, Q, D]."""
        return F.normalize(self.vision_proj(self.qformer(self.image_features(images))[0]), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised [CLS] embeddings [B, D] of the text alone."""
        return F.normalize(self.text_proj(self.qformer(None, input_ids, attention_mask)[1][:, 0]), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)

    def itm_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """What `itm_score` takes of an image: the frozen encoder's features."""
        return self.image_features(images)

    def itm_score(self, image_feats: torch.Tensor, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> torch.Tensor:
        """Match probability of each (image, text) pair."""
        return self.itm_logits(image_feats, input_ids, attention_mask).softmax(dim=-1)[:, 1]

    def itm_logits(self, image_feats: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """Match logits [B, 2]: the ITM head on every query output, averaged (Sec. 3.2)."""
        queries = self.qformer(image_feats, input_ids, attention_mask, mode="bidirectional")[0]
        return self.itm_head(queries).mean(dim=1)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        feats = self.image_features(batch["images"])
        losses = {}
        if {"itc", "itm"} & self.objectives:
            image_emb = F.normalize(self.vision_proj(self.qformer(feats)[0]), dim=-1)
            text_emb = self.encode_text(ids, mask)
        if "itc" in self.objectives:
            losses["itc"] = itc_loss(image_emb, text_emb, self.scale(), similarity=max_query_similarity)
        if "itm" in self.objectives:
            scale = self.scale() if self.cfg.hard_negatives else torch.zeros(())
            images, texts, masks, labels = itm_inputs(feats, ids, mask, ids, image_emb, text_emb, scale,
                                                      similarity=max_query_similarity)
            losses["itm"] = F.cross_entropy(self.itm_logits(images, texts, masks), labels)
        if "itg" in self.objectives:
            dec_ids = with_first_token(ids, self.cfg.tokens["dec"])
            text_states = self.qformer(feats, dec_ids, mask, mode="causal")[1]
            losses["itg"] = lm_loss(self.lm_head(text_states), dec_ids, mask,
                                    label_smoothing=self.cfg.label_smoothing)
        return losses
