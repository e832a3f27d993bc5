"""CLIP checkpoints: Hugging Face `CLIPModel` and open_clip `CLIP` (ViT towers).

Both are vlp's CLIP with pre-LN blocks, `ln_pre` on the image tokens, class-token pooling and
EOS pooling of a causal text tower; what differs is configuration (activation: `quick_gelu`
for OpenAI's weights, LayerNorm eps, MLP width) and weight names. Text pooling: vlp pools the
last real token of a right-padded row, HF the first `eos_token_id` (or, in legacy configs, the
highest id), open_clip the highest id; all three pick the end-of-text token of a tokenized
caption, which is what the tokenizers produce.
"""

from __future__ import annotations

from typing import Any

from vlp.interop.mapping import Entry, block_entries, pairs, require, tower_from_hf, tower_to_hf

HF_BLOCK = {
    "attn.qkv.{p}": ("self_attn.q_proj.{p}", "self_attn.k_proj.{p}", "self_attn.v_proj.{p}"),
    "attn.out.{p}": "self_attn.out_proj.{p}",
    "norm1.{p}": "layer_norm1.{p}",
    "mlp.fc1.{p}": "mlp.fc1.{p}",
    "mlp.fc2.{p}": "mlp.fc2.{p}",
    "norm2.{p}": "layer_norm2.{p}",
}
OPEN_CLIP_BLOCK = {
    "attn.qkv.{p}": "attn.in_proj_{p}",
    "attn.out.{p}": "attn.out_proj.{p}",
    "norm1.{p}": "ln_1.{p}",
    "mlp.fc1.{p}": "mlp.c_fc.{p}",
    "mlp.fc2.{p}": "mlp.c_proj.{p}",
    "norm2.{p}": "ln_2.{p}",
}


def architecture(*_: Any) -> str:
    """The transformers class of every CLIP checkpoint vlp reads or writes."""
    return "CLIPModel"


def config_from_hf(hf: dict[str, Any], tokens: dict[str, int]) -> tuple[str, dict[str, Any]]:
    """(recipe, vlp CLIP config) of a transformers `CLIPConfig` dict."""
    v, t = hf["vision_config"], hf["text_config"]
    return "clip", {
        "embed_dim": hf["projection_dim"],
        "vision": {
            **tower_from_hf(v, "quick_gelu", 1e-5),
            "pre_norm": True,
            "image_size": v["image_size"],
            "patch_size": v["patch_size"],
            "pool": "cls",
            "ln_pre": True,
            "patch_bias": False,
            "stem": "patch",
        },
        "text": {
            **tower_from_hf(t, "quick_gelu", 1e-5),
            "pre_norm": True,
            "vocab_size": t["vocab_size"],
            "context_length": t["max_position_embeddings"],
            "causal": True,
            "pool": "eos",
            "embed_norm": False,
        },
    }


def config_to_hf(model: Any, architecture: str) -> dict[str, Any]:
    """transformers `CLIPConfig` kwargs of a vlp CLIP; errors name what HF cannot express."""
    cfg, tokenizer = model.cfg, model.tokenizer
    v, t = cfg.vision, cfg.text
    require(
        {
            "vision.pool": (v.pool, "cls"),
            "vision.ln_pre": (v.ln_pre, True),
            "vision.patch_bias": (v.patch_bias, False),
            "vision.stem": (v.stem, "patch"),
            "vision.pre_norm": (v.pre_norm, True),
            "text.pre_norm": (t.pre_norm, True),
            "text.causal": (t.causal, True),
            "text.pool": (t.pool, "eos"),
            "text.embed_norm": (t.embed_norm, False),
        },
        "transformers' CLIPModel",
    )
    text = {**tower_to_hf(t), "vocab_size": t.vocab_size, "max_position_embeddings": t.context_length}
    if tokenizer is not None and tokenizer.eot_id is not None:
        text["eos_token_id"] = tokenizer.eot_id
    return {
        "projection_dim": cfg.embed_dim,
        "text_config": text,
        "vision_config": {**tower_to_hf(v), "image_size": v.image_size, "patch_size": v.patch_size},
    }


def hf_entries(model: Any, architecture: str = "CLIPModel") -> list[Entry]:
    """vlp CLIP <-> transformers CLIPModel weight names."""
    cfg = model.cfg
    return [
        Entry("visual.cls_token", ("vision_model.embeddings.class_embedding",)),
        Entry("visual.patch_embed.weight", ("vision_model.embeddings.patch_embedding.weight",)),
        Entry("visual.pos_embed", ("vision_model.embeddings.position_embedding.weight",)),
        *pairs("visual.", "vision_model.", [("norm_pre", "pre_layrnorm"), ("norm", "post_layernorm")]),
        *block_entries("visual.transformer.blocks", "vision_model.encoder.layers", cfg.vision.layers, HF_BLOCK),
        Entry("text.token_embed.weight", ("text_model.embeddings.token_embedding.weight",)),
        Entry("text.pos_embed", ("text_model.embeddings.position_embedding.weight",)),
        *block_entries("text.transformer.blocks", "text_model.encoder.layers", cfg.text.layers, HF_BLOCK),
        *pairs("text.", "text_model.", [("norm", "final_layer_norm")]),
        Entry("image_proj.weight", ("visual_projection.weight",)),
        Entry("text_proj.weight", ("text_projection.weight",)),
        Entry("logit_scale", ("logit_scale",)),
    ]


def config_from_open_clip(model_cfg: dict[str, Any], tokens: dict[str, int]) -> tuple[str, dict[str, Any]]:
    """(recipe, vlp CLIP config) of an open_clip model config (`open_clip_config.json`'s `model_cfg`)."""
    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    if "timm_model_name" in v or "hf_model_name" in t or isinstance(v.get("layers"), (list, tuple)):
        raise ValueError(
            "only open_clip's own ViT image and text towers are supported (not timm, ResNet or Hugging Face towers)"
        )
    unsupported = [
        k
        for k in (
            "attentional_pool",
            "no_ln_pre",
            "final_ln_after_pool",
            "ls_init_value",
            "patch_dropout",
            "pos_embed_type",
        )
        if v.get(k) not in (None, False, 0, 0.0, "learnable")
    ]
    unsupported += [
        k
        for k in ("no_causal_mask", "proj_bias", "ls_init_value", "embed_cls")
        if t.get(k) not in (None, False, 0, 0.0)
    ]
    if t.get("pool_type", "argmax") != "argmax" or v.get("pool_type", "tok") != "tok":
        unsupported.append("pool_type")
    if unsupported:
        raise ValueError(f"open_clip options vlp does not map: {sorted(set(unsupported))}")
    vw, tw = v.get("width", 768), t.get("width", 512)
    vision = {
        "width": vw,
        "layers": v.get("layers", 12),
        "heads": vw // v.get("head_width", 64),
        "mlp_dim": int(vw * v.get("mlp_ratio", 4.0)),
    }
    text = {
        "width": tw,
        "layers": t.get("layers", 12),
        "heads": t.get("heads", 8),
        "mlp_dim": int(tw * t.get("mlp_ratio", 4.0)),
    }
    common = {"act": "quick_gelu" if model_cfg.get("quick_gelu") else "gelu", "eps": 1e-5, "pre_norm": True}
    return "clip", {
        "embed_dim": model_cfg["embed_dim"],
        "vision": {
            **vision,
            **common,
            "image_size": v.get("image_size", 224),
            "patch_size": v.get("patch_size", 16),
            "pool": "cls",
            "ln_pre": True,
            "patch_bias": False,
            "stem": "patch",
        },
        "text": {
            **text,
            **common,
            "vocab_size": t.get("vocab_size", 49408),
            "context_length": t.get("context_length", 77),
            "causal": True,
            "pool": "eos",
            "embed_norm": False,
        },
    }


def open_clip_entries(model: Any, architecture: str = "CLIP") -> list[Entry]:
    """vlp CLIP <-> open_clip CLIP state-dict names (projections stored as x @ W)."""
    cfg = model.cfg
    return [
        Entry("visual.cls_token", ("visual.class_embedding",)),
        Entry("visual.patch_embed.weight", ("visual.conv1.weight",)),
        Entry("visual.pos_embed", ("visual.positional_embedding",)),
        *pairs("visual.", "visual.", [("norm_pre", "ln_pre"), ("norm", "ln_post")]),
        *block_entries("visual.transformer.blocks", "visual.transformer.resblocks", cfg.vision.layers, OPEN_CLIP_BLOCK),
        Entry("text.token_embed.weight", ("token_embedding.weight",)),
        Entry("text.pos_embed", ("positional_embedding",)),
        *block_entries("text.transformer.blocks", "transformer.resblocks", cfg.text.layers, OPEN_CLIP_BLOCK),
        *pairs("text.", "", [("norm", "ln_final")]),
        Entry("image_proj.weight", ("visual.proj",), transpose=True),
        Entry("text_proj.weight", ("text_projection",), transpose=True),
        Entry("logit_scale", ("logit_scale",)),
    ]
