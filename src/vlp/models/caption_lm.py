"""A small decoder-only language model of captions: BLIP-2's frozen LLM, in miniature.

BLIP-2 stage 2 needs a pretrained causal LM (OPT in the paper). On the shapes world there is
none to download, so vlp trains one on the captions: a transformers `OPTForCausalLM` built from
this recipe's config (same architecture family as the paper's, and loadable by
`AutoModelForCausalLM`), trained on the text of each batch alone: captions and, with
`data.text: caption+qa` (its config), question-answer pairs written as text, so that like a large
LM it knows the zero-shot VQA prompt's format without having seen an image. `vlp convert RUN DIR
--to hf` writes it, with its tokenizer, as the directory `blip2_stage2` takes as `model.lm`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vlp.models.recipe import Recipe
from vlp.models.registry import register
from vlp.nn.text import TextConfig
from vlp.nn.tokens import require_tokens

if TYPE_CHECKING:
    from vlp.config import RunConfig
    from vlp.data.tokenizer import Tokenizer


@dataclass
class CaptionLMConfig:
    text: TextConfig = field(default_factory=lambda: TextConfig(width=128, layers=4, heads=4))
    tokens: dict[str, int] = field(default_factory=dict)  # special ids, filled from the tokenizer


@register("caption_lm", CaptionLMConfig)
class CaptionLM(Recipe):
    tokenizer_style = "clip"  # <|startoftext|> caption <|endoftext|>: OPT's bos ... eos
    eval_tasks: tuple[str, ...] = ()

    def __init__(self, cfg: CaptionLMConfig, tokenizer: Tokenizer | None = None, run_config: RunConfig | None = None):
        super().__init__(cfg, tokenizer, run_config)
        from transformers import OPTConfig, OPTForCausalLM

        require_tokens(cfg.tokens, ("pad", "sot", "eot"))
        t = cfg.text
        self.cfg = cfg
        self.lm = OPTForCausalLM(
            OPTConfig(
                vocab_size=t.vocab_size,
                hidden_size=t.width,
                num_hidden_layers=t.layers,
                num_attention_heads=t.heads,
                ffn_dim=t.mlp_dim or int(t.width * t.mlp_ratio),
                max_position_embeddings=t.context_length,
                word_embed_proj_dim=t.width,
                bos_token_id=cfg.tokens["sot"],
                eos_token_id=cfg.tokens["eot"],
                pad_token_id=cfg.tokens["pad"],
                dropout=0.0,
                attention_dropout=0.0,
            )
        )

    def image_size(self) -> None:
        return None  # text only

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Next-token loss on the texts (padding not scored); images are not used. In training
        each text starts at a random position of the context, so every position embedding is
        learned, as a large LM's are: BLIP-2's visual prompt moves the text right by its queries
        (Sec. 3.3), to positions that short captions alone never reach."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = ids.masked_fill(mask == 0, -100)
        positions = None
        if self.training:
            room = self.cfg.text.context_length - ids.shape[1]
            shift = torch.randint(0, room + 1, (len(ids), 1), device=ids.device)
            positions = shift + torch.arange(ids.shape[1], device=ids.device)
        return {"lm": self.lm(input_ids=ids, attention_mask=mask, labels=labels, position_ids=positions).loss}

    writes_own_hf = True

    def save_hf(self, out: Path) -> Path:
        """The OPT model and a tokenizer directory `AutoTokenizer` reads (bos/eos/pad named)."""
        self.lm.save_pretrained(out)
        tokenizer = self.tokenizer
        tokenizer.save_for_causal_lm(out / "tokenizer.json")
        ids = {"bos_token": tokenizer.sot_id, "eos_token": tokenizer.eot_id, "pad_token": tokenizer.pad_id}
        names = {key: tokenizer.id_to_token(i) for key, i in ids.items()}
        (out / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **names}, indent=2)
        )
        return out
