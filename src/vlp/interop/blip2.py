"""BLIP-2 checkpoints of transformers: `Blip2ForConditionalGeneration` with a decoder-only LM
(OPT in the released weights) loads as vlp's `blip2_stage2`.

The image tower is BLIP's (pre-LN, no `ln_pre`, a patch bias); transformers keeps the tower
whose last block BLIP-2 dropped, and its `post_layernorm` is the paper's `ln_vision`, so vlp
runs every block without its own final norm (`vision_layers` = all of them). The Q-Former of a
stage-2 checkpoint holds only the query stream: no word embeddings and no text feed-forward
weights, which are absent rather than missing. The language model is rebuilt from the
checkpoint's `text_config` with transformers and given its `language_model.*` weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlp.interop.blip import VISION_BLOCK
from vlp.interop.mapping import CheckpointMismatch, Entry, block_entries, pairs, tower_from_hf

QFORMER_BLOCK = {
    "attn.qkv.{p}": ("attention.attention.query.{p}", "attention.attention.key.{p}", "attention.attention.value.{p}"),
    "attn.out.{p}": "attention.output.dense.{p}",
    "norm1.{p}": "attention.output.LayerNorm.{p}",
    "mlp_first.fc1.{p}": "intermediate_query.dense.{p}",
    "mlp_first.fc2.{p}": "output_query.dense.{p}",
    "norm2_first.{p}": "output_query.LayerNorm.{p}",
}
CROSS_BLOCK = {
    "cross_attn.q.{p}": "crossattention.attention.query.{p}",
    "cross_attn.kv.{p}": ("crossattention.attention.key.{p}", "crossattention.attention.value.{p}"),
    "cross_attn.out.{p}": "crossattention.output.dense.{p}",
    "norm_cross.{p}": "crossattention.output.LayerNorm.{p}",
}
LM_PREFIX = "language_model."


def architecture(hf: dict[str, Any] | None = None, task: str | None = None) -> str:
    return "Blip2ForConditionalGeneration"


def config_from_hf(hf: dict[str, Any], tokens: dict[str, int]) -> tuple[str, dict[str, Any]]:
    """(recipe, vlp config) of a transformers `Blip2Config` dict."""
    v, q = hf["vision_config"], hf["qformer_config"]
    if hf["text_config"].get("is_encoder_decoder"):
        raise ValueError("BLIP-2 with an encoder-decoder LM (T5) is not supported yet; OPT-style LMs are")
    vision = {
        **tower_from_hf(v, "gelu", 1e-6),
        "pre_norm": True,
        "image_size": v["image_size"],
        "patch_size": v["patch_size"],
        "pool": "cls",
        "ln_pre": False,
        "patch_bias": True,
        "stem": "patch",
    }
    qformer = {
        **tower_from_hf(q, "gelu", 1e-12),
        "num_queries": hf.get("num_query_tokens", 32),
        "cross_attention_every": q.get("cross_attention_frequency", 2),
        "vocab_size": q.get("vocab_size", 30522),
        "context_length": q.get("max_position_embeddings", 512),
    }
    return "blip2_stage2", {
        "vision": vision,
        "vision_layers": v["num_hidden_layers"],
        "qformer": qformer,
        "tokens": tokens,
    }


def build(model_cls: type, cfg: Any, hf: dict[str, Any], path: Path, source: dict[str, torch.Tensor]) -> Any:
    """The vlp model with its frozen LM rebuilt from `text_config`; the LM's weights are taken
    out of `source` (what is left maps to the vlp modules)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    text = dict(hf["text_config"])
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(text.pop("model_type"), **text))
    weights = {k[len(LM_PREFIX) :]: source.pop(k) for k in [k for k in source if k.startswith(LM_PREFIX)]}
    missing, unexpected = lm.load_state_dict(weights, strict=False)
    if lm.config.tie_word_embeddings:  # the output layer is the input embedding, stored once
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointMismatch(f"{path}: language model missing {missing[:8]}, unexpected {unexpected[:8]}")
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "vocab.json"))
    return model_cls(
        cfg, lm=lm.eval(), lm_tokenizer=AutoTokenizer.from_pretrained(str(path)) if has_tokenizer else None
    )


def hf_entries(model: Any, architecture: str = "Blip2ForConditionalGeneration") -> list[Entry]:
    """vlp BLIP-2 stage 2 <-> transformers Blip2ForConditionalGeneration (without the LM)."""
    cfg, v = model.cfg, "vision_model."
    q = cfg.qformer
    crossing = range(0, q.layers, q.cross_attention_every)
    return [
        Entry("visual.cls_token", (v + "embeddings.class_embedding",)),
        *pairs("visual.", v + "embeddings.", [("patch_embed", "patch_embedding")]),
        Entry("visual.pos_embed", (v + "embeddings.position_embedding",)),
        *block_entries("visual.transformer.blocks", v + "encoder.layers", cfg.vision.layers, VISION_BLOCK),
        *pairs("", v, [("ln_vision", "post_layernorm")]),
        Entry("qformer.query_tokens", ("query_tokens",)),
        *pairs("qformer.text.", "qformer.", [("embed_norm", "layernorm")]),
        *block_entries("qformer.text.transformer.blocks", "qformer.encoder.layer", q.layers, QFORMER_BLOCK),
        *[
            e
            for e in block_entries("qformer.text.transformer.blocks", "qformer.encoder.layer", q.layers, CROSS_BLOCK)
            if int(e.vlp.split(".")[4]) in crossing
        ],
        *pairs("", "", [("language_projection", "language_projection")]),
    ]


def absent(model: Any, architecture: str = "") -> tuple[str, ...]:
    """The Q-Former's text stream and the tower's final norm, which a stage-2 checkpoint lacks."""
    blocks = "qformer.text.transformer.blocks"
    return (
        "visual.norm.",
        "qformer.text.token_embed.",
        "qformer.text.pos_embed",
        *[f"{blocks}.{i}.{part}." for i in range(model.cfg.qformer.layers) for part in ("mlp", "norm2")],
    )
