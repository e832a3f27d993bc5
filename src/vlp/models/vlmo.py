"""VLMo (Bao et al. 2022): one multiway transformer for images, text and image-text pairs.

Sec. 3.1: every block has one self-attention shared by all modalities and a pool of
feed-forward "modality experts": V-FFN for image tokens, L-FFN for text tokens and, in the top
F blocks, VL-FFN for the tokens of a fused image-text sequence. The experts are configuration
of the shared `Block` (`split_ffn`: the leading image segment goes through `mlp_first`, the
text through `mlp`; `fusion_ffn_layers`: `mlp_fusion` in the top blocks). Three modes:

- image only and text only (a dual encoder: ITC, fast retrieval);
- fusion: [image tokens; text tokens] in one sequence, V/L experts below, VL on top (ITM, MLM).

Sec. 3.2: ITC in dual-encoder mode, ITM with hard negatives and MLM in fusion mode. Sec. 3.3,
stagewise pretraining: masked image modeling on images (`mim`, image-only mode), then masked
language modeling on text (`text_mlm`, text-only mode) with the attention and V-FFNs frozen
(`train.freeze`), then the image-text objectives; configs `vlmo_stage1`, `vlmo_stage2`, `vlmo`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from vlp.losses.itc import itc_loss
from vlp.losses.mim import block_mask
from vlp.losses.mlm import IGNORE, mask_caption, mlm_loss
from vlp.models.fusion import itm_inputs
from vlp.models.recipe import Recipe
from vlp.models.registry import register
from vlp.nn.attention import padding_mask
from vlp.nn.heads import TokenPredictionHead, clamped_scale, itm_head, log_temperature
from vlp.nn.image_tokenizer import ImageTokenizer
from vlp.nn.text import TextConfig, TextTransformer
from vlp.nn.tokens import require_tokens
from vlp.nn.transformer import Transformer, TransformerConfig, init_weights
from vlp.nn.vit import VisionConfig, VisionTransformer

if TYPE_CHECKING:
    from vlp.config import RunConfig
    from vlp.data.tokenizer import Tokenizer

OBJECTIVES = ("itc", "itm", "mlm", "mim", "text_mlm")
IMAGE, TEXT = 0, 1


@dataclass
class VLMoConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)  # image size, patches and the shared stack's sizes
    text: TextConfig = field(default_factory=lambda: TextConfig(causal=False, pool="cls"))  # vocabulary, length
    fusion_layers: int = 2  # top blocks with a VL-FFN (VLMo-base: 2 of 12)
    embed_dim: int = 128
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0  # CLIP's clamp (Sec. 2.5)
    hard_negatives: bool = True
    # The fused sequence's token the ITM head reads: "text", the text [CLS], as the paper pools the
    # pair (Sec. 2.2), or "image", the image [CLS] that leads vlp's [image; text] sequence (what
    # runs before 2026-12-03 pooled; their ITM stayed at the label prior: docs/recipes.md).
    itm_token: str = "text"
    mlm_probability: float = 0.15  # text tokens masked in image-text pairs (fusion mode)
    text_mlm_probability: float = 0.15  # text-only MLM
    mim_ratio: float = 0.4  # patches hidden, block-wise
    image_tokenizer: str = ""  # codebook file of `vlp tokenizer image` (the MIM targets)
    codebook_size: int = 256
    objectives: tuple[str, ...] = ("itc", "itm", "mlm")
    tokens: dict[str, int] = field(default_factory=dict)  # special ids, filled from the tokenizer


@register("vlmo", VLMoConfig)
class VLMo(Recipe):
    tokenizer_style = "bert"
    eval_tasks = ("zeroshot", "retrieval", "probe")

    def __init__(self, cfg: VLMoConfig, tokenizer: Tokenizer | None = None, run_config: RunConfig | None = None):
        super().__init__(cfg, tokenizer, run_config)
        require_tokens(cfg.tokens, ("pad", "cls", "sep", "mask"))
        if cfg.itm_token not in ("text", "image"):
            raise ValueError(f"model.itm_token must be 'text' or 'image', got {cfg.itm_token!r}")
        if not cfg.objectives or set(cfg.objectives) - set(OBJECTIVES):
            raise ValueError(f"model.objectives must be a non-empty subset of {list(OBJECTIVES)}")
        if not 0 <= cfg.fusion_layers <= cfg.vision.layers:
            raise ValueError(f"model.fusion_layers must be in [0, {cfg.vision.layers}], got {cfg.fusion_layers}")
        width = cfg.vision.width
        cfg.text = replace(cfg.text, width=width, heads=cfg.vision.heads, eps=cfg.vision.eps)
        self.cfg, self.objectives = cfg, set(cfg.objectives)
        # The towers' embedding layers only; every block lives in the one shared stack.
        self.vision_embed = VisionTransformer(replace(cfg.vision, layers=0))
        self.text_embed = TextTransformer(replace(cfg.text, layers=0))
        self.vision_embed.norm = self.text_embed.norm = nn.Identity()
        self.type_embed = nn.Embedding(2, width)  # image / text
        init_weights(self.type_embed)  # std 0.02 as BERT's token types: N(0, 1) swamped the tokens
        stack = {f.name: getattr(cfg.vision, f.name) for f in fields(TransformerConfig)}  # the shared stack's sizes
        self.transformer = Transformer(
            TransformerConfig(**{**stack, "pre_norm": True, "split_ffn": True, "fusion_ffn_layers": cfg.fusion_layers})
        )
        self.norm = nn.LayerNorm(width, eps=cfg.vision.eps)
        self.image_proj = nn.Linear(width, cfg.embed_dim)
        self.text_proj = nn.Linear(width, cfg.embed_dim)
        self.itm_head = itm_head(width)
        self.mlm_head = TokenPredictionHead(width, self.text_embed.token_embed, cfg.vision.act, cfg.vision.eps)
        self.logit_scale = log_temperature(cfg.init_temperature)
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.mim_head = nn.Linear(width, cfg.codebook_size)
        self.image_tokenizer = (
            ImageTokenizer.load(cfg.image_tokenizer)
            if cfg.image_tokenizer
            else ImageTokenizer(cfg.codebook_size, cfg.vision.patch_size)
        )
        if self.image_tokenizer.centroids.shape[0] != cfg.codebook_size:
            raise ValueError(
                f"{cfg.image_tokenizer}: codebook of {self.image_tokenizer.centroids.shape[0]} "
                f"tokens, model.codebook_size is {cfg.codebook_size}"
            )
        self.has_unused_parameters = True  # a VL-FFN is idle in dual-encoder steps, experts in others

    def scale(self) -> torch.Tensor:
        return clamped_scale(self.logit_scale, self.cfg.max_logit_scale)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        return self.vision_embed.embed(images) + self.type_embed.weight[IMAGE]

    def text_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_embed.embed(input_ids) + self.type_embed.weight[TEXT]

    def image_states(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """Image-only mode (of `image_embeddings(images)`): every block's V-FFN."""
        return self.norm(self.transformer(image_embeddings))

    def text_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text-only mode: every block's L-FFN."""
        x = self.text_embeddings(input_ids)
        return self.norm(self.transformer(x, mask=padding_mask(attention_mask), split=0))

    def fused_states(
        self,
        image_embeddings: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        text_embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fusion mode over [image; text]: V-FFN and L-FFN below the top blocks, VL-FFN in them."""
        text = self.text_embeddings(input_ids) if text_embeddings is None else text_embeddings
        images = image_embeddings.shape[1]
        keys = torch.cat([attention_mask.new_ones(attention_mask.shape[0], images), attention_mask], dim=1)
        x, mask, split = torch.cat([image_embeddings, text], dim=1), padding_mask(keys), images
        bottom = slice(0, self.cfg.vision.layers - self.cfg.fusion_layers)
        x = self.transformer(x, mask=mask, split=split, layers=bottom)
        x = self.transformer(x, mask=mask, fused=True, layers=slice(bottom.stop, None))
        return self.norm(x)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self._image_feature(self.image_embeddings(images))

    def _image_feature(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image_states(image_embeddings)[:, 0]), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text_states(input_ids, attention_mask)[:, 0]), dim=-1)

    def itm_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """What `itm_score` takes of an image: its embeddings (the fusion runs the whole stack)."""
        return self.image_embeddings(images)

    def itm_logits(
        self,
        image_embeddings: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ITM head on the fused sequence's [CLS] that `itm_token` names; text i is fused with
        `image_embeddings[image_rows[i]]` where rows are given (one sequence per pair: the
        image's tokens are in it, so each pair runs them)."""
        if image_rows is not None:
            image_embeddings = image_embeddings[image_rows]
        pooled = image_embeddings.shape[1] if self.cfg.itm_token == "text" else 0  # [image; text]
        return self.itm_head(self.fused_states(image_embeddings, input_ids, attention_mask)[:, pooled])

    def has_itm(self) -> bool:
        return "itm" in self.objectives

    def itm_score(
        self,
        image_embeddings: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.itm_logits(image_embeddings, input_ids, attention_mask, image_rows).softmax(dim=-1)[:, 1]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if {"itc", "itm", "mlm"} & self.objectives:  # stage 1 (MIM) embeds its masked images itself
            image_emb = self.image_embeddings(batch["images"])
        losses = {}
        if {"itc", "itm"} & self.objectives:
            image_feat = self._image_feature(image_emb)
            text_feat = self.encode_text(ids, mask)
        if "itc" in self.objectives:
            losses["itc"] = itc_loss(image_feat, text_feat, self.scale())
        if "itm" in self.objectives:
            scale = self.scale() if self.cfg.hard_negatives else torch.zeros(())
            itm = itm_inputs(image_emb, ids, mask, ids, image_feat, text_feat, scale)
            losses["itm"] = F.cross_entropy(
                self.itm_logits(itm.images, itm.texts, itm.masks, itm.image_rows), itm.labels
            )
        if "mlm" in self.objectives:
            masked, labels = mask_caption(
                ids, mask, self.cfg.tokens, self.cfg.text.vocab_size, self.cfg.mlm_probability
            )
            states = self.fused_states(image_emb, masked, mask)[:, image_emb.shape[1] :]
            losses["mlm"] = mlm_loss(self.mlm_head(states), labels)
        if "text_mlm" in self.objectives:
            masked, labels = mask_caption(
                ids, mask, self.cfg.tokens, self.cfg.text.vocab_size, self.cfg.text_mlm_probability
            )
            losses["text_mlm"] = mlm_loss(self.mlm_head(self.text_states(masked, mask)), labels)
        if "mim" in self.objectives:
            losses["mim"] = self._mim(batch["images"])
        return losses

    def _mim(self, images: torch.Tensor) -> torch.Tensor:
        """Predict the visual tokens of block-masked patches in image-only mode (BEiT Sec. 2.2)."""
        grid = self.cfg.vision.image_size // self.cfg.vision.patch_size
        hidden = block_mask(len(images), grid, self.cfg.mim_ratio).to(images.device)
        labels = torch.where(hidden, self.image_tokenizer.encode(images), IGNORE)
        x = self.vision_embed.embed(images, hidden, self.mask_token) + self.type_embed.weight[IMAGE]
        return mlm_loss(self.mim_head(self.image_states(x)[:, 1:]), labels)
