"""ALBEF (Li et al. 2021, "Align before Fuse"): align unimodal features with ITC, then fuse.

Sec. 3.1: a ViT image encoder and a BERT split in two: the bottom layers encode the text alone,
the top layers fuse it with the image patches through cross-attention. Sec. 3.2: ITC, ITM with
hard negatives, MLM conditioned on the image. Sec. 3.3: momentum distillation on ITC and MLM
(not on ITM).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from vlp.losses.mlm import mask_caption, mlm_loss
from vlp.models.fusion import ContrastiveConfig, FusionModel
from vlp.models.registry import register
from vlp.nn.heads import TokenPredictionHead
from vlp.nn.text import TextConfig, TextTransformer, bert_text_config
from vlp.nn.vit import VisionConfig

if TYPE_CHECKING:
    from vlp.config import RunConfig
    from vlp.data.tokenizer import Tokenizer


@dataclass
class ALBEFConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=lambda: bert_text_config(cross_attention_every=1, cross_attention_from=2))
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    mlm_probability: float = 0.15
    objectives: tuple[str, ...] = ("itc", "itm", "mlm")  # ablations keep a subset (Sec. 6, Table 1)
    tokens: dict[str, int] = field(default_factory=dict)  # special ids, filled from the tokenizer


@register("albef", ALBEFConfig)
class ALBEF(FusionModel):
    required_tokens = ("pad", "cls", "sep", "mask")
    objective_names = ("itc", "itm", "mlm")

    def __init__(self, cfg: ALBEFConfig, tokenizer: Tokenizer | None = None, run_config: RunConfig | None = None):
        split = cfg.text.cross_attention_from
        if not 0 < split < cfg.text.layers:
            raise ValueError(
                "model.text.cross_attention_from must split the text layers into a "
                f"text part and a fusion part, got {split} of {cfg.text.layers}"
            )
        cfg.text = replace(cfg.text, context_dim=cfg.vision.width)
        super().__init__(cfg, tokenizer, run_config)
        self.text_layers, self.fusion_layers = slice(0, split), slice(split, None)
        self.mlm_head = TokenPredictionHead(cfg.text.width, self.text.token_embed, cfg.text.act, cfg.text.eps)
        self._add_momentum(mlm_head=self.mlm_head)

    def fuse(
        self,
        text_states: torch.Tensor,
        attention_mask: torch.Tensor,
        image_tokens: torch.Tensor,
        text: TextTransformer | None = None,
        image_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The fusion layers on the text encoder's states, cross-attending to image tokens
        (text i to `image_tokens[image_rows[i]]` where rows are given)."""
        return (text or self.text)(
            None,
            attention_mask,
            context=image_tokens,
            hidden=text_states,
            layers=self.fusion_layers,
            context_rows=image_rows,
        )[1]

    def itm_score(
        self,
        image_tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Match probability of each (image tokens, text) pair: the ITM head on the fused [CLS]
        (text i with `image_tokens[image_rows[i]]` where rows are given)."""
        states = self.text(input_ids, attention_mask, layers=self.text_layers)[1]
        logits = self.itm_head(self.fuse(states, attention_mask, image_tokens, image_rows=image_rows)[:, 0])
        return logits.softmax(dim=-1)[:, 1]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """ITC, ITM and MLM (those in `objectives`) from one unimodal pass (Sec. 3)."""
        aligned = self.align(batch)
        losses = {}
        if "itc" in self.objectives:
            losses["itc"] = aligned["itc"]
        if "itm" in self.objectives:
            itm = self.itm_batch(aligned, aligned["text_states"], batch)
            fused = self.fuse(itm.texts, itm.masks, itm.images, image_rows=itm.image_rows)
            losses["itm"] = F.cross_entropy(self.itm_head(fused[:, 0]), itm.labels)
        if "mlm" in self.objectives:
            losses["mlm"] = self._mlm(batch, aligned)
        return losses

    def _mlm(self, batch: dict[str, torch.Tensor], aligned: dict[str, torch.Tensor]) -> torch.Tensor:
        """MLM conditioned on the image; soft targets from the momentum model (Sec. 3.3)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        masked, labels = mask_caption(ids, mask, self.cfg.tokens, self.cfg.text.vocab_size, self.cfg.mlm_probability)
        states = self.text(masked, mask, layers=self.text_layers)[1]
        logits = self.mlm_head(self.fuse(states, mask, aligned["image_tokens"]))
        if self.momentum is None:
            return mlm_loss(logits, labels)
        with torch.no_grad():
            text_m = self.momentum["text"]
            states_m = text_m(masked, mask, layers=self.text_layers)[1]
            fused_m = self.fuse(states_m, mask, aligned["image_tokens_m"], text_m)
            soft = self.momentum["mlm_head"](fused_m).softmax(dim=-1)
        return mlm_loss(logits, labels, soft, self.contrast.alpha())
