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

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from vlp.losses.itc import itc_loss, max_query_similarity
from vlp.losses.lm import lm_loss
from vlp.models.blip import with_first_token
from vlp.models.fusion import itm_inputs
from vlp.models.recipe import Recipe
from vlp.models.registry import register
from vlp.nn.heads import TokenPredictionHead, clamped_scale, itm_head, log_temperature
from vlp.nn.qformer import QFormer, QFormerConfig
from vlp.nn.tokens import require_tokens
from vlp.nn.vit import VisionConfig, VisionTransformer
from vlp.prompts import QA_PROMPT

if TYPE_CHECKING:
    from vlp.config import RunConfig
    from vlp.data.tokenizer import Tokenizer

OBJECTIVES = ("itc", "itg", "itm")


@dataclass
class BLIP2Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    vision_layers: int = -1  # blocks of the frozen encoder to run; -1: all but the last (Sec. 3.1)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    embed_dim: int = 256
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0  # CLIP's clamp (Sec. 2.5)
    hard_negatives: bool = True
    label_smoothing: float = 0.1
    objectives: tuple[str, ...] = OBJECTIVES
    tokens: dict[str, int] = field(default_factory=dict)  # special ids, filled from the tokenizer


class QueryingModel(Recipe):
    """What both stages share: the frozen image tower, `ln_vision` and the Q-Former."""

    tokenizer_style = "bert"
    text_section = "qformer"  # the config section whose vocab_size follows the tokenizer

    def __init__(
        self,
        cfg: BLIP2Config | BLIP2Stage2Config,
        tokenizer: Tokenizer | None = None,
        run_config: RunConfig | None = None,
    ):
        cfg.qformer = replace(cfg.qformer, context_dim=cfg.vision.width)
        super().__init__(cfg, tokenizer, run_config)
        self.visual = VisionTransformer(cfg.vision).requires_grad_(False)
        self.ln_vision = nn.LayerNorm(cfg.vision.width)
        self.qformer = QFormer(cfg.qformer)

    def train(self, mode: bool = True) -> QueryingModel:
        """The frozen image encoder stays in eval mode."""
        super().train(mode)
        self.visual.eval()
        return self

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen encoder's penultimate-block tokens, through the trainable `ln_vision`."""
        with torch.no_grad():
            tokens = self.visual(images, layers=self.cfg.vision_layers)[1]
        return self.ln_vision(tokens)


@register("blip2_stage1", BLIP2Config)
class BLIP2Stage1(QueryingModel):
    eval_tasks = ("zeroshot", "retrieval", "probe")

    def __init__(self, cfg: BLIP2Config, tokenizer: Tokenizer | None = None, run_config: RunConfig | None = None):
        require_tokens(cfg.tokens, ("pad", "cls", "sep", "dec"))
        if not cfg.objectives or set(cfg.objectives) - set(OBJECTIVES):
            raise ValueError(
                f"model.objectives must be a non-empty subset of {list(OBJECTIVES)}, got {list(cfg.objectives)}"
            )
        super().__init__(cfg, tokenizer, run_config)
        self.objectives = set(cfg.objectives)
        width = cfg.qformer.width
        self.vision_proj = nn.Linear(width, cfg.embed_dim)
        self.text_proj = nn.Linear(width, cfg.embed_dim)
        self.itm_head = itm_head(width)
        self.lm_head = TokenPredictionHead(width, self.qformer.text.token_embed, cfg.qformer.act, cfg.qformer.eps)
        self.logit_scale = log_temperature(cfg.init_temperature)
        self.has_unused_parameters = self.objectives != set(OBJECTIVES)

    def embedding_similarity(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Image embeddings are [B, Q, D]: a text scores its best query (Sec. 3.2)."""
        return max_query_similarity(image_emb, text_emb)

    def has_itm(self) -> bool:
        return "itm" in self.objectives

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised per-query embeddings [B, Q, D]."""
        return F.normalize(self.vision_proj(self.qformer(self.image_features(images))[0]), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised [CLS] embeddings [B, D] of the text alone."""
        return F.normalize(self.text_proj(self.qformer(None, input_ids, attention_mask)[1][:, 0]), dim=-1)

    def scale(self) -> torch.Tensor:
        return clamped_scale(self.logit_scale, self.cfg.max_logit_scale)

    def itm_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """What `itm_score` takes of an image: the frozen encoder's features."""
        return self.image_features(images)

    def itm_score(
        self,
        image_feats: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Match probability of each (image, text) pair (rows as in `itm_logits`)."""
        return self.itm_logits(image_feats, input_ids, attention_mask, image_rows).softmax(dim=-1)[:, 1]

    def itm_logits(
        self,
        image_feats: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Match logits [B, 2]: the ITM head on every query output, averaged (Sec. 3.2); text i
        is paired with `image_feats[image_rows[i]]` where rows are given."""
        queries = self.qformer(image_feats, input_ids, attention_mask, mode="bidirectional", image_rows=image_rows)[0]
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
            itm = itm_inputs(feats, ids, mask, ids, image_emb, text_emb, scale, similarity=max_query_similarity)
            losses["itm"] = F.cross_entropy(
                self.itm_logits(itm.images, itm.texts, itm.masks, itm.image_rows), itm.labels
            )
        if "itg" in self.objectives:
            dec_ids = with_first_token(ids, self.cfg.tokens["dec"])
            text_states = self.qformer(feats, dec_ids, mask, mode="causal")[1]
            losses["itg"] = lm_loss(self.lm_head(text_states), dec_ids, mask, label_smoothing=self.cfg.label_smoothing)
        return losses


@dataclass
class BLIP2Stage2Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    vision_layers: int = -1
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    lm: str = ""  # directory of a transformers causal (OPT, GPT-2) or seq2seq (T5) LM, kept frozen
    prompt: str = ""  # text between the visual prompt and the caption, not scored ("a photo of")
    max_text_length: int = 32
    # Encoder-decoder LMs (T5): split each caption at a random word, the prefix to the encoder
    # (the prefix LM loss of pre-training, Sec. 3.3); false: the whole caption is the decoder's
    # target after `prompt` alone (captioning).
    split_captions: bool = True
    # The LM token id transformers' BLIP-2 replaces by the visual prompt (its `image_token_index`),
    # kept for saving back; None for a LM that has none (saving then asks for one).
    image_token: int | None = None
    tokens: dict[str, int] = field(default_factory=dict)  # special ids, filled from the tokenizer


@register("blip2_stage2", BLIP2Stage2Config)
class BLIP2Stage2(QueryingModel):
    """BLIP-2 stage 2 (Sec. 3.3): the query outputs, projected to the LM's width, are a soft
    visual prompt in front of the text of a frozen LM: a decoder-only LM trained with its LM
    loss, or an encoder-decoder LM (T5) with the prefix LM loss.

    The LM is loaded from `model.lm` and is not part of the model's state dict (checkpoints hold
    what trains: the Q-Former, `ln_vision` and `language_projection`); it follows the model's
    device and dtype. Captions are tokenized with the LM's own tokenizer (`batch["texts"]`).
    """

    eval_tasks = ("caption", "vqa")
    can_caption = True
    vqa_prompt = QA_PROMPT  # zero-shot VQA (Sec. 4.2)

    def __init__(
        self,
        cfg: BLIP2Stage2Config,
        tokenizer: Tokenizer | None = None,
        run_config: RunConfig | None = None,
        lm: nn.Module | None = None,
        lm_tokenizer: Any = None,
    ):
        """`lm` and `lm_tokenizer` replace loading `model.lm` (a checkpoint that holds its LM)."""
        if lm is None and not cfg.lm:
            raise ValueError(
                "model.lm must name a transformers causal LM directory (docs/recipes.md shows "
                "how to train a small one on the shapes world)"
            )
        super().__init__(cfg, tokenizer, run_config)
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForSeq2SeqLM,
            AutoTokenizer,
        )

        if lm is None:
            if not Path(cfg.lm).is_dir():
                raise FileNotFoundError(
                    f"model.lm: {cfg.lm} is not a directory (a transformers LM saved "
                    "with save_pretrained; download hub models first)"
                )
            seq2seq = AutoConfig.from_pretrained(cfg.lm).is_encoder_decoder
            lm = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(cfg.lm)
            lm_tokenizer = AutoTokenizer.from_pretrained(cfg.lm)
        object.__setattr__(self, "lm", lm.eval().requires_grad_(False))  # frozen, not a registered submodule
        self.lm_tokenizer = lm_tokenizer
        self.language_projection = nn.Linear(cfg.qformer.width, lm.config.hidden_size)
        self.has_unused_parameters = True  # the Q-Former's text stream has no part in stage 2

    def save_files(self, out: Path) -> None:
        """Write the frozen LM and its tokenizer as a transformers directory, `out/lm`, and point
        `model.lm` there (the saved run's config then loads it)."""
        self.lm.save_pretrained(out / "lm")
        if self.lm_tokenizer is not None:
            self.lm_tokenizer.save_pretrained(out / "lm")
        self.cfg.lm = str(out / "lm")

    def _apply(self, fn, recurse: bool = True) -> BLIP2Stage2:
        super()._apply(fn, recurse)
        self.lm._apply(fn)
        return self

    def visual_prompt(self, images: torch.Tensor) -> torch.Tensor:
        """[B, Q, LM width]: the projected query outputs."""
        return self.language_projection(self.qformer(self.image_features(images))[0])

    def _token_ids(self, texts: list[str], eos: bool, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded LM token ids and mask, with the LM's end token after each text if `eos`; padded
        on the left for generation (the pads then sit between the visual prompt and the text,
        masked, and the LM's positions follow the mask)."""
        tok = self.lm_tokenizer
        rows = [ids[: self.cfg.max_text_length - eos] for ids in tok(texts)["input_ids"]]  # the LM's own framing
        if eos:  # an end token, unless the tokenizer already ends texts with one (T5 does)
            rows = [r if r[-1:] == [tok.eos_token_id] else r + [tok.eos_token_id] for r in rows]
        width = max(len(r) for r in rows)

        def pad(row: list[int], value: int) -> list[int]:
            fill = [value] * (width - len(row))
            return fill + row if left else row + fill

        ids = torch.tensor([pad(r, tok.pad_token_id) for r in rows], dtype=torch.long)
        mask = torch.tensor([pad([1] * len(r), 0) for r in rows], dtype=torch.long)
        return ids, mask

    def _inputs(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prompt = self.visual_prompt(images)
        device = prompt.device
        embeds = torch.cat([prompt, self.lm.get_input_embeddings()(ids.to(device)).to(prompt.dtype)], dim=1)
        return embeds, torch.cat([torch.ones(prompt.shape[:2], dtype=mask.dtype, device=device), mask.to(device)], 1)

    def lm_output(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, **lm_inputs: Any) -> Any:
        """The frozen LM's output (`.logits`, `.loss`) on the visual prompt followed by the LM
        tokens `ids` [B, T]: the whole input of a decoder-only LM, the encoder's of an
        encoder-decoder one, whose decoder inputs (`labels`, `decoder_input_ids`) go in `lm_inputs`."""
        embeds, attention = self._inputs(images, ids, mask)
        return self.lm(inputs_embeds=embeds, attention_mask=attention, **lm_inputs)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """LM loss on the caption tokens after the visual prompt and `prompt`; for an
        encoder-decoder LM, the prefix LM loss (Sec. 3.3)."""
        if self.lm.config.is_encoder_decoder:
            return {"lm": self._prefix_lm_loss(batch["images"], batch["texts"])}
        prompt_length = self._token_ids([self.cfg.prompt], eos=False)[0].shape[1] if self.cfg.prompt else 0
        ids, mask = self._token_ids([self.cfg.prompt + t for t in batch["texts"]], eos=True)
        embeds, attention = self._inputs(batch["images"], ids, mask)
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :prompt_length] = -100
        queries = torch.full((len(ids), embeds.shape[1] - ids.shape[1]), -100)
        labels = torch.cat([queries, labels], dim=1).to(embeds.device)
        return {"lm": self.lm(inputs_embeds=embeds, attention_mask=attention, labels=labels).loss}

    def _prefix_lm_loss(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Each caption split at a random word: the visual prompt and the prefix go to the
        encoder, the decoder is scored on generating the suffix (Sec. 3.3, Fig. 4). Without
        `split_captions` the encoder reads the visual prompt and `prompt`, the decoder the caption."""
        if self.cfg.split_captions:
            words = [text.split() for text in texts]
            cuts = [int(torch.randint(1, len(w), ())) if len(w) > 1 else len(w) for w in words]
            prefixes = [self.cfg.prompt + " ".join(w[:c]) for w, c in zip(words, cuts)]
            suffixes = [" ".join(w[c:]) for w, c in zip(words, cuts)]
        else:
            prefixes, suffixes = [self.cfg.prompt] * len(texts), list(texts)
        ids, mask = self._token_ids(suffixes, eos=True)
        labels = ids.masked_fill(mask == 0, -100).to(self.language_projection.weight.device)
        return self.lm_output(images, *self._token_ids(prefixes, eos=False), labels=labels).loss

    @torch.no_grad()
    def caption(
        self,
        images: torch.Tensor,
        prompt: str | list[str] | None = None,
        method: str = "beam",
        max_new_tokens: int = 20,
        min_new_tokens: int = 0,
        **options,
    ) -> list[str]:
        """Zero-shot captions (or, with a prompt such as "Question: ... Answer:", answers) from
        the frozen LM's `generate`, as text after the prompt (one prompt, or one per image)."""
        prompt = self.cfg.prompt if prompt is None else prompt
        prompts = [prompt] * len(images) if isinstance(prompt, str) else prompt
        # Left-padded for a decoder-only LM, which continues the prompt; an encoder reads the
        # prompt whole, right after the visual prompt (its relative positions as in training).
        ids, mask = self._token_ids(prompts, eos=False, left=not self.lm.config.is_encoder_decoder)
        embeds, attention = self._inputs(images, ids, mask)
        tok = self.lm_tokenizer
        out = self.lm.generate(
            inputs_embeds=embeds,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **hf_decoding(method, options),
        )
        return [text.strip() for text in tok.batch_decode(out, skip_special_tokens=True)]

    def answer_texts(self, images: torch.Tensor, questions: list[str]) -> list[str]:
        """Zero-shot answers: greedy generation after "Question: ... Answer:"."""
        return self.caption(images, [self.vqa_prompt.format(q) for q in questions], "greedy", max_new_tokens=5)


def hf_decoding(method: str, options: dict) -> dict:
    """vlp decoding options as transformers `generate` keyword arguments."""
    if method == "greedy":
        return {"do_sample": False, "num_beams": 1, **options}
    if method == "beam":
        return {"do_sample": False, "num_beams": options.pop("num_beams", 3), **options}
    if method == "nucleus":
        return {"do_sample": True, "top_k": 0, **options}
    raise ValueError(f"unknown decoding method {method!r}; choose from greedy, beam, nucleus")
