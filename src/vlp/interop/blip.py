"""BLIP checkpoints of transformers: `BlipForImageTextRetrieval` (ITC + ITM),
`BlipForConditionalGeneration` (captioning decoder) and `BlipForQuestionAnswering`.

All three are vlp's BLIP/BLIP-VQA: a pre-LN ViT without `ln_pre` and with a patch bias, BERT
text towers (post-LN, embedding LayerNorm, cross-attention in every layer). Each checkpoint
holds only the parts its task uses, so the vlp model is built with just those objectives and the
other parts are reported as absent, not missing: a captioning checkpoint has no ITC/ITM weights
and evaluates only captioning. transformers does not replace the first token by [ENC] for ITM and
VQA questions as the BLIP paper (and vlp) does: vlp's inputs follow the paper.
"""

from __future__ import annotations

from typing import Any

from vlp.interop.mapping import Entry, block_entries, pairs, require, tower_from_hf, tower_to_hf

VISION_BLOCK = {
    "attn.qkv.{p}": "self_attn.qkv.{p}",
    "attn.out.{p}": "self_attn.projection.{p}",
    "norm1.{p}": "layer_norm1.{p}",
    "mlp.fc1.{p}": "mlp.fc1.{p}",
    "mlp.fc2.{p}": "mlp.fc2.{p}",
    "norm2.{p}": "layer_norm2.{p}",
}
BERT_BLOCK = {
    "attn.qkv.{p}": ("attention.self.query.{p}", "attention.self.key.{p}", "attention.self.value.{p}"),
    "attn.out.{p}": "attention.output.dense.{p}",
    "norm1.{p}": "attention.output.LayerNorm.{p}",
    "cross_attn.q.{p}": "crossattention.self.query.{p}",
    "cross_attn.kv.{p}": ("crossattention.self.key.{p}", "crossattention.self.value.{p}"),
    "cross_attn.out.{p}": "crossattention.output.dense.{p}",
    "norm_cross.{p}": "crossattention.output.LayerNorm.{p}",
    "mlp.fc1.{p}": "intermediate.dense.{p}",
    "mlp.fc2.{p}": "output.dense.{p}",
    "norm2.{p}": "output.LayerNorm.{p}",
}
# model_type "blip" covers three tasks, told apart by `architectures` in config.json: the vlp
# recipe and objectives of each, and the vlp modules its checkpoints hold.
TASKS = {
    "BlipForImageTextRetrieval": ("blip", ["itc", "itm"]),
    "BlipForConditionalGeneration": ("blip", ["lm"]),
    "BlipForQuestionAnswering": ("blip_vqa", ["lm"]),
}
PARTS = {
    "BlipForImageTextRetrieval": {"visual", "text", "image_proj", "text_proj", "itm_head"},
    "BlipForConditionalGeneration": {"visual", "decoder", "lm_head"},
    "BlipForQuestionAnswering": {"visual", "text", "decoder", "lm_head"},
}
SAVE_TASKS = {"retrieval": "BlipForImageTextRetrieval", "captioning": "BlipForConditionalGeneration"}


def architecture_of(hf: dict[str, Any]) -> str:
    architecture = (hf.get("architectures") or ["BlipForConditionalGeneration"])[0]
    if architecture not in TASKS:
        raise ValueError(f"BLIP architecture {architecture!r} is not supported; vlp loads {sorted(TASKS)}")
    return architecture


def architecture_for(model: Any, task: str | None) -> str:
    """The transformers class a vlp BLIP saves as: VQA models as VQA; otherwise the task asked
    for, or the one its objectives imply (a BLIP with all three must be told)."""
    if model.recipe == "blip_vqa":
        return "BlipForQuestionAnswering"
    if task is None:
        if model.objectives == {"lm"}:
            return SAVE_TASKS["captioning"]
        if "lm" not in model.objectives:
            return SAVE_TASKS["retrieval"]
        raise ValueError(
            "a BLIP with ITC, ITM and LM maps to two transformers models: "
            "pass task='retrieval' (ITC + ITM) or task='captioning' (decoder)"
        )
    if task not in SAVE_TASKS:
        raise ValueError(f"BLIP task must be one of {sorted(SAVE_TASKS)}, got {task!r}")
    return SAVE_TASKS[task]


def config_from_hf(hf: dict[str, Any], tokens: dict[str, int]) -> tuple[str, dict[str, Any]]:
    """(vlp recipe, model config) of a transformers `BlipConfig` dict; `tokens` are the
    tokenizer's special ids, [DEC] and [SEP] taken from the config where it names them."""
    v, t = hf["vision_config"], hf["text_config"]
    recipe, objectives = TASKS[architecture_of(hf)]
    vision = {
        **tower_from_hf(v, "gelu", 1e-5),
        "pre_norm": True,
        "image_size": v["image_size"],
        "patch_size": v["patch_size"],
        "pool": "cls",
        "ln_pre": False,
        "patch_bias": True,
        "stem": "patch",
    }
    text = {
        **tower_from_hf(t, "gelu", 1e-12),
        "pre_norm": False,
        "vocab_size": t["vocab_size"],
        "context_length": t["max_position_embeddings"],
        "causal": False,
        "pool": "cls",
        "embed_norm": True,
        "cross_attention_every": 1,
    }
    named = {"dec": t.get("bos_token_id"), "sep": t.get("sep_token_id"), "pad": t.get("pad_token_id")}
    tokens = {**tokens, **{k: i for k, i in named.items() if i is not None}}
    return recipe, {
        "vision": vision,
        "text": text,
        "objectives": objectives,
        "tokens": tokens,
        "share_decoder": False,
        "contrastive": {"embed_dim": hf.get("image_text_hidden_size", 256), "momentum": 0.0},
    }


def config_to_hf(model: Any, architecture: str) -> dict[str, Any]:
    """transformers `BlipConfig` kwargs of a vlp BLIP; errors name what BLIP cannot express."""
    v, t, tokens = model.cfg.vision, model.cfg.text, model.cfg.tokens
    require(
        {
            "vision.pre_norm": (v.pre_norm, True),
            "vision.ln_pre": (v.ln_pre, False),
            "vision.patch_bias": (v.patch_bias, True),
            "vision.pool": (v.pool, "cls"),
            "vision.stem": (v.stem, "patch"),
            "text.pre_norm": (t.pre_norm, False),
            "text.embed_norm": (t.embed_norm, True),
            "text.cross_attention_every": (t.cross_attention_every, 1),
            "text.cross_attention_from": (t.cross_attention_from, 0),
        },
        "transformers' BLIP",
    )
    text = {
        **tower_to_hf(t),
        "vocab_size": t.vocab_size,
        "max_position_embeddings": t.context_length,
        "encoder_hidden_size": v.width,
        "bos_token_id": tokens["dec"],
        "sep_token_id": tokens["sep"],
        "pad_token_id": tokens["pad"],
    }
    vision = {**tower_to_hf(v), "image_size": v.image_size, "patch_size": v.patch_size}
    return {
        "text_config": text,
        "vision_config": vision,
        "image_text_hidden_size": model.cfg.contrastive.embed_dim,
        "architectures": [architecture],
    }


def _text(vlp_prefix: str, src_prefix: str, layers: int) -> list[Entry]:
    return [
        Entry(f"{vlp_prefix}.token_embed.weight", (f"{src_prefix}.embeddings.word_embeddings.weight",)),
        Entry(f"{vlp_prefix}.pos_embed", (f"{src_prefix}.embeddings.position_embeddings.weight",)),
        *pairs(f"{vlp_prefix}.", f"{src_prefix}.", [("embed_norm", "embeddings.LayerNorm")]),
        *block_entries(f"{vlp_prefix}.transformer.blocks", f"{src_prefix}.encoder.layer", layers, BERT_BLOCK),
    ]


def hf_entries(model: Any, architecture: str) -> list[Entry]:
    """vlp BLIP / BLIP-VQA <-> one transformers BLIP task model (the parts it holds)."""
    cfg, parts, v = model.cfg, PARTS[architecture], "vision_model."
    entries = [
        Entry("visual.cls_token", (v + "embeddings.class_embedding",)),
        *pairs("visual.", v + "embeddings.", [("patch_embed", "patch_embedding")]),
        Entry("visual.pos_embed", (v + "embeddings.position_embedding",)),
        *block_entries("visual.transformer.blocks", v + "encoder.layers", cfg.vision.layers, VISION_BLOCK),
        *pairs("visual.", v, [("norm", "post_layernorm")]),
    ]
    if "text" in parts:
        entries += _text("text", "text_encoder", cfg.text.layers)
    if "itm_head" in parts:
        entries += pairs("", "", [("image_proj", "vision_proj"), ("text_proj", "text_proj"), ("itm_head", "itm_head")])
    if "decoder" in parts:
        entries += [
            *_text("decoder", "text_decoder.bert", cfg.text.layers),
            *pairs("lm_head.", "text_decoder.cls.predictions.transform.", [("dense", "dense"), ("norm", "LayerNorm")]),
            Entry("lm_head.decoder.weight", ("text_decoder.bert.embeddings.word_embeddings.weight",)),
            Entry("lm_head.decoder.bias", ("text_decoder.cls.predictions.bias",)),
        ]
    return entries


def absent(model: Any, architecture: str) -> tuple[str, ...]:
    """Prefixes of the vlp weights a checkpoint of this architecture does not hold (transformers
    keeps no ITC temperature at all)."""
    held = PARTS[architecture]
    return tuple(f"{name}." for name, _ in model.named_children() if name not in held)
