"""CoCa (Yu et al. 2022, "Contrastive Captioners"): contrastive and captioning in one pass.

Sec. 3.2: the text decoder is split in two. Its unimodal (causal, no image) layers read the
caption with a learned [CLS] token appended after it; the [CLS] output is the text embedding for
the contrastive loss. Its multimodal layers continue from the unimodal token states, cross-attend
to the image and predict the next token. The image side pools the encoder's tokens with two
attentional poolers: 1 query for the contrastive embedding, N for the decoder. The loss is
ITC + 2.0 x captioning (Sec. 3.3; the weight is `train.loss_weights.caption`), from one forward
pass of each text stack per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from vlp.generate import generate
from vlp.losses.itc import itc_loss
from vlp.losses.lm import lm_loss
from vlp.models.recipe import Recipe
from vlp.models.registry import register
from vlp.nn.attention import KVCache
from vlp.nn.heads import AttentionalPooler, clamped_scale, log_temperature
from vlp.nn.text import TextConfig, TextTransformer
from vlp.nn.tokens import cap_new_tokens, require_tokens
from vlp.nn.transformer import Transformer
from vlp.nn.vit import VisionConfig, VisionTransformer

if TYPE_CHECKING:
    from vlp.config import RunConfig
    from vlp.data.tokenizer import Tokenizer


@dataclass
class CoCaConfig:
    embed_dim: int = 128
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)  # the unimodal (causal) layers
    multimodal_layers: int = 2  # causal layers with cross-attention, as wide as the text
    caption_queries: int = 32  # attentional pooler queries for the decoder (256 in the paper)
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    label_smoothing: float = 0.0
    tokens: dict[str, int] = field(default_factory=dict)  # special ids, filled from the tokenizer


@register("coca", CoCaConfig)
class CoCa(Recipe):
    tokenizer_style = "clip"  # <|startoftext|> ... <|endoftext|>
    eval_tasks = ("zeroshot", "retrieval", "probe", "caption")
    can_caption = True

    def __init__(self, cfg: CoCaConfig, tokenizer: Tokenizer | None = None, run_config: RunConfig | None = None):
        super().__init__(cfg, tokenizer, run_config)
        require_tokens(cfg.tokens, ("pad", "sot", "eot"))
        if not cfg.text.causal:
            raise ValueError("coca: model.text.causal must be true (the text stack is a decoder)")
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision)
        width, vision_width = cfg.text.width, cfg.vision.width
        self.contrastive_pooler = AttentionalPooler(vision_width, vision_width, cfg.vision.heads, 1, cfg.vision.eps)
        self.caption_pooler = AttentionalPooler(
            vision_width, vision_width, cfg.vision.heads, cfg.caption_queries, cfg.vision.eps
        )
        self.text = TextTransformer(cfg.text)
        self.cls_embed = nn.Parameter(torch.randn(width) * width**-0.5)
        self.multimodal = Transformer(
            replace(
                cfg.text,
                layers=cfg.multimodal_layers,
                cross_attention_every=1,
                cross_attention_from=0,
                context_dim=vision_width,
            )
        )
        self.multimodal_norm = nn.LayerNorm(width, eps=cfg.text.eps)
        self.lm_head = nn.Linear(width, cfg.text.vocab_size)
        self.image_proj = nn.Linear(vision_width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(width, cfg.embed_dim, bias=False)
        self.logit_scale = log_temperature(cfg.init_temperature)

    def scale(self) -> torch.Tensor:
        return clamped_scale(self.logit_scale, self.cfg.max_logit_scale)

    def similarity(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        return self.scale() * image_emb @ text_emb.T

    def image_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised embedding [B, D], decoder context [B, N, W]) from one encoder pass."""
        tokens = self.visual(images)[1]
        pooled = self.contrastive_pooler(tokens)[:, 0]
        return F.normalize(self.image_proj(pooled), dim=-1), self.caption_pooler(tokens)

    def unimodal(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised text embedding [B, D], token states [B, L, W]) of one causal pass, the
        [CLS] token placed right after each caption's last real token: it sees the whole caption,
        the caption never sees it, and no padding mask is needed."""
        x = self.text.embed(input_ids)
        x = torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[2])], dim=1)
        rows, ends = torch.arange(x.shape[0], device=x.device), attention_mask.sum(dim=1)
        x[rows, ends] = self.cls_embed.to(x.dtype)
        x = self.text.norm(self.text.transformer(x, is_causal=True))
        return F.normalize(self.text_proj(x[rows, ends]), dim=-1), x[:, :-1]

    def caption_logits(
        self, token_states: torch.Tensor, context: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Next-token logits [B, L, V] of the multimodal layers over the unimodal states."""
        x = self.multimodal(token_states, is_causal=True, context=context, cache=cache)
        return self.lm_head(self.multimodal_norm(x))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_outputs(images)[0]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.unimodal(input_ids, attention_mask)[0]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """ITC and captioning from one pass of each stack (Sec. 3.3)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        image_emb, context = self.image_outputs(batch["images"])
        text_emb, token_states = self.unimodal(ids, mask)
        logits = self.caption_logits(token_states, context)
        return {
            "itc": itc_loss(image_emb, text_emb, self.scale()),
            "caption": lm_loss(
                logits, ids, mask, prompt_length=batch.get("prompt_length", 0), label_smoothing=self.cfg.label_smoothing
            ),
        }

    @torch.no_grad()
    def generate(
        self, images: torch.Tensor, prompt_ids: torch.Tensor | None = None, method: str = "beam", **options
    ) -> torch.Tensor:
        """Captions [B, 1 + P + T] starting with <|startoftext|> and the prompt's tokens; options
        as `vlp.generate.generate`."""
        batch = images.shape[0]
        start = torch.full((batch, 1), self.cfg.tokens["sot"], dtype=torch.long, device=images.device)
        prompt = start if prompt_ids is None else torch.cat([start, prompt_ids.expand(batch, -1)], dim=1)
        options = cap_new_tokens(options, self.cfg.text.context_length, prompt.shape[1])
        state = (KVCache(), KVCache(), self.image_outputs(images)[1])
        return generate(
            CaptionDecoder(self),
            prompt,
            state,
            method,
            eos_id=self.cfg.tokens["eot"],
            pad_id=self.cfg.tokens["pad"],
            **options,
        )


class CaptionDecoder:
    """CoCa's text stacks as a `vlp.generate` decoder: the state is one key/value cache per
    stack and the pooled image tokens the multimodal layers attend to."""

    def __init__(self, model: CoCa):
        self.model = model

    def step(self, tokens: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        unimodal_cache, multimodal_cache, context = state
        states = self.model.text(tokens, torch.ones_like(tokens), cache=unimodal_cache)[1]
        return self.model.caption_logits(states, context, multimodal_cache)[:, -1], state

    def reorder(self, state: tuple, index: torch.Tensor, same_context: bool = False) -> tuple:
        unimodal_cache, multimodal_cache, context = state
        if same_context:
            return unimodal_cache.reorder(index), multimodal_cache.reorder(index, context=False), context
        return unimodal_cache.reorder(index), multimodal_cache.reorder(index), context.index_select(0, index)
