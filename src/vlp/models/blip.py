"""BLIP (Li et al. 2022): a multimodal mixture of encoder-decoder (MED), pretrained with ITC,
ITM and LM.

Sec. 3.1: one ViT pass; the text goes through three modes of one BERT: the unimodal encoder
([CLS], no cross-attention) for ITC, the image-grounded encoder ([ENC], cross-attention in every
layer) for ITM, and the image-grounded decoder ([DEC], causal self-attention) for LM. The decoder
shares every parameter with the encoder except the self-attention layers. Sec. 3.2: momentum
encoders and queues for ITC (as ALBEF), hard negatives for ITM, label smoothing 0.1 for LM.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from vlp.generate import generate
from vlp.losses.lm import lm_loss
from vlp.models.fusion import ContrastiveConfig, FusionModel
from vlp.models.registry import register
from vlp.nn.attention import KVCache, padding_mask
from vlp.nn.heads import TokenPredictionHead
from vlp.nn.text import (
    TextConfig,
    TextTransformer,
    bert_text_config,
    tie_except_self_attention,
)
from vlp.nn.tokens import cap_new_tokens
from vlp.nn.vit import VisionConfig

if TYPE_CHECKING:
    from vlp.config import RunConfig
    from vlp.data.tokenizer import Tokenizer


@dataclass
class BLIPConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=lambda: bert_text_config(cross_attention_every=1))
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    share_decoder: bool = True  # MED: the decoder shares all but self-attention with the encoder
    objectives: tuple[str, ...] = ("itc", "itm", "lm")  # fine-tuning keeps a subset (Sec. 4)
    label_smoothing: float = 0.1
    tokens: dict[str, int] = field(default_factory=dict)  # special ids, filled from the tokenizer


def with_first_token(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """The ids with the first ([CLS]) token replaced by a task token ([ENC] or [DEC])."""
    ids = input_ids.clone()
    ids[:, 0] = token_id
    return ids


@register("blip", BLIPConfig)
class BLIP(FusionModel):
    required_tokens = ("pad", "cls", "sep", "enc", "dec")
    objective_names = ("itc", "itm", "lm")

    def __init__(self, cfg: BLIPConfig, tokenizer: Tokenizer | None = None, run_config: RunConfig | None = None):
        cfg.text = replace(cfg.text, context_dim=cfg.vision.width)
        super().__init__(cfg, tokenizer, run_config)
        self.decoder = TextTransformer(replace(cfg.text, causal=True, context_dim=self.decoder_context_width()))
        if cfg.share_decoder:
            tie_except_self_attention(self.text, self.decoder)
        self.lm_head = TokenPredictionHead(cfg.text.width, self.decoder.token_embed, cfg.text.act, cfg.text.eps)
        if "itc" in self.objectives:
            self._add_momentum()

    @property
    def can_caption(self) -> bool:
        return "lm" in self.objectives

    @property
    def eval_tasks(self) -> tuple[str, ...]:
        """Embedding tasks where ITC was trained, captioning where LM was."""
        tasks = ("zeroshot", "retrieval", "probe") if "itc" in self.objectives else ()
        return tasks + (("caption",) if "lm" in self.objectives else ())

    def decoder_context_width(self) -> int:
        """Width of what the decoder cross-attends to: image tokens for captioning."""
        return self.cfg.vision.width

    def itm_logits(
        self,
        image_tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_rows: torch.Tensor | None = None,
        image_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """The image-grounded encoder ([ENC], cross-attention) and the ITM head; text i sees
        `image_tokens[image_rows[i]]` where rows are given. `image_cache` (context-only) holds
        or receives the images' cross-attention keys/values."""
        ids = with_first_token(input_ids, self.cfg.tokens["enc"])
        states = self.text(ids, attention_mask, context=image_tokens, context_rows=image_rows, cache=image_cache)[1]
        return self.itm_head(states[:, 0])

    def itm_score(
        self,
        image_tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Match probability of each (image tokens, text) pair (rows as in `itm_logits`)."""
        return self.itm_logits(image_tokens, input_ids, attention_mask, image_rows).softmax(dim=-1)[:, 1]

    def caption_logits(
        self,
        image_tokens: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_rows: torch.Tensor | None = None,
        image_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Next-token logits [B, L, V] of the image-grounded decoder ([DEC], causal); rows and
        cache as in `itm_logits`."""
        ids = with_first_token(input_ids, self.cfg.tokens["dec"])
        states = self.decoder(ids, attention_mask, context=image_tokens, context_rows=image_rows, cache=image_cache)[1]
        return self.lm_head(states)

    @torch.no_grad()
    def generate(
        self, images: torch.Tensor, prompt_ids: torch.Tensor | None = None, method: str = "beam", **options
    ) -> torch.Tensor:
        """Captions of a batch of images as token ids [B, P + T], starting with [DEC] and the
        prompt's tokens (`prompt_ids` without their start token; none by default).
        Options as `vlp.generate.generate` (max_new_tokens, num_beams, top_p, ...); the length
        is capped at the text context length."""
        batch = images.shape[0]
        start = torch.full((batch, 1), self.cfg.tokens["dec"], dtype=torch.long, device=images.device)
        prompt = start if prompt_ids is None else torch.cat([start, prompt_ids.expand(batch, -1)], dim=1)
        return self._decode(prompt, self.visual(images)[1], None, method, **options)

    def _decode(
        self, prompt: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None, method: str, **options
    ) -> torch.Tensor:
        options = cap_new_tokens(options, self.cfg.text.context_length, prompt.shape[1])
        return generate(
            GroundedDecoder(self),
            prompt,
            (KVCache(), context, context_mask),
            method,
            eos_id=self.cfg.tokens["sep"],
            pad_id=self.cfg.tokens["pad"],
            **options,
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One ViT pass, three text passes (Sec. 3.2): ITC, ITM, LM (those in `objectives`).
        With the MED's tied cross-attention, ITM and LM share the images' keys/values."""
        objectives = self.objectives
        if {"itc", "itm"} & objectives:
            aligned = self.align(batch)
            image_tokens = aligned["image_tokens"]
        else:
            image_tokens = self.visual(batch["images"])[1]
        losses, image_rows = {}, None
        image_cache = KVCache(context_only=True) if self.cfg.share_decoder else None
        if "itc" in objectives:
            losses["itc"] = aligned["itc"]
        if "itm" in objectives:
            itm = self.itm_batch(aligned, batch["input_ids"], batch)
            logits = self.itm_logits(itm.images, itm.texts, itm.masks, itm.image_rows, image_cache)
            losses["itm"] = F.cross_entropy(logits, itm.labels)
            # the first B pairs are the positives: this rank's images among the gathered ones
            image_tokens, image_rows = itm.images, itm.image_rows[: len(batch["input_ids"])]
        if "lm" in objectives:
            logits = self.caption_logits(
                image_tokens, batch["input_ids"], batch["attention_mask"], image_rows, image_cache
            )
            losses["lm"] = lm_loss(
                logits,
                batch["input_ids"],
                batch["attention_mask"],
                prompt_length=batch.get("prompt_length", 0),
                label_smoothing=self.cfg.label_smoothing,
            )
        return losses


class GroundedDecoder:
    """A BLIP decoder as a `vlp.generate` decoder: the state is the key/value cache and the
    context it cross-attends to (image tokens, or question states and their padding mask for
    VQA); all of it follows the beams on `reorder`."""

    def __init__(self, model: BLIP):
        self.model = model

    def step(self, tokens: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        cache, context, context_mask = state
        states = self.model.decoder(
            tokens, torch.ones_like(tokens), context=context, context_mask=context_mask, cache=cache
        )[1]
        return self.model.lm_head(states[:, -1]), state

    def reorder(self, state: tuple, index: torch.Tensor, same_context: bool = False) -> tuple:
        cache, context, context_mask = state
        if same_context:
            return cache.reorder(index, context=False), context, context_mask
        return (
            cache.reorder(index),
            context.index_select(0, index),
            None if context_mask is None else context_mask.index_select(0, index),
        )


@register("blip_vqa", BLIPConfig)
class BLIPVQA(BLIP):
    """BLIP for VQA (Sec. 5.3, Fig. 5): the image-grounded encoder reads the question ([ENC],
    cross-attention to the image); an answer decoder, cross-attending to those question states,
    generates the answer. Trained with the LM loss on answers (`data.text: qa`)."""

    eval_tasks = ("vqa",)

    def __init__(self, cfg: BLIPConfig, tokenizer: Tokenizer | None = None, run_config: RunConfig | None = None):
        if cfg.share_decoder:
            raise ValueError(
                "blip_vqa: model.share_decoder must be false (the answer decoder "
                "cross-attends to question states, not to image tokens)"
            )
        super().__init__(cfg, tokenizer, run_config)
        for unused in (self.image_proj, self.text_proj, self.itm_head, self.contrast):
            unused.requires_grad_(False)  # kept so pretrained runs load without surprises

    def decoder_context_width(self) -> int:
        return self.cfg.text.width

    def encode_question(
        self, images: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor
    ) -> torch.Tensor:
        ids = with_first_token(question_ids, self.cfg.tokens["enc"])
        return self.text(ids, question_mask, context=self.visual(images)[1])[1]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        questions = self.encode_question(batch["images"], batch["input_ids"], batch["attention_mask"])
        answer_ids = with_first_token(batch["answer_ids"], self.cfg.tokens["dec"])
        states = self.decoder(
            answer_ids, batch["answer_mask"], context=questions, context_mask=padding_mask(batch["attention_mask"])
        )[1]
        return {
            "vqa": lm_loss(
                self.lm_head(states), answer_ids, batch["answer_mask"], label_smoothing=self.cfg.label_smoothing
            )
        }

    def answer_texts(self, images: torch.Tensor, questions: list[str]) -> list[str]:
        """Greedy answers, as text, to one question per image."""
        encoded = self.tokenizer(questions, max_length=self.cfg.text.context_length, style=self.tokenizer_style)
        ids = self.answer(images, encoded["input_ids"].to(images.device), encoded["attention_mask"].to(images.device))
        return self.tokenizer.batch_decode(ids[:, 1:])

    @torch.no_grad()
    def answer(
        self,
        images: torch.Tensor,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        method: str = "greedy",
        **options,
    ) -> torch.Tensor:
        """Answer token ids [B, 1 + T] (after [DEC]), generated from the question states."""
        questions = self.encode_question(images, question_ids, question_mask)
        start = torch.full((len(images), 1), self.cfg.tokens["dec"], dtype=torch.long, device=images.device)
        options.setdefault("max_new_tokens", 5)
        return self._decode(start, questions, padding_mask(question_mask), method, **options)
