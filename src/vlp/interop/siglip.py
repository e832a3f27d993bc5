"""SigLIP checkpoints: transformers `SiglipModel` and open_clip's SigLIP (a timm image tower and
open_clip's own text tower), both ways.

All three are vlp's SigLIP (Zhai et al. 2023): a ViT without class token pooled by a MAP probe,
a bidirectional text tower pooling the last position of captions padded to the context length,
then a linear head; logit scale t' and bias b. The attention pooling's input projection is one
fused [q; k; v] matrix in transformers (`nn.MultiheadAttention`) and q + kv in timm; vlp keeps
the fused one, so both map by concatenation. transformers' text head must project to the image
width (its image embedding has no projection); so must open_clip's (`timm_proj: none`).

open_clip names its image tower by a timm model name, which fixes every size; a vlp model is
saved for open_clip only when a registered timm SigLIP model has its image tower's shape.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from vlp.interop.clip import HF_BLOCK, OPEN_CLIP_BLOCK
from vlp.interop.mapping import Entry, block_entries, pairs, require

# transformers activation names <-> vlp's (`vlp.nn.transformer.ACTIVATIONS`)
HF_ACT = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu", "relu": "relu"}
VLP_ACT = {v: k for k, v in HF_ACT.items()}
TIMM_BLOCK = {
    "attn.qkv.{p}": "attn.qkv.{p}",
    "attn.out.{p}": "attn.proj.{p}",
    "norm1.{p}": "norm1.{p}",
    "mlp.fc1.{p}": "mlp.fc1.{p}",
    "mlp.fc2.{p}": "mlp.fc2.{p}",
    "norm2.{p}": "norm2.{p}",
}
OPEN_CLIP_CONFIG = "open_clip_config.json"


def architecture(*_: Any) -> str:
    """The transformers class of every SigLIP checkpoint vlp reads or writes."""
    return "SiglipModel"


def _hf_act(name: str) -> str:
    if name not in HF_ACT:
        raise ValueError(f"SigLIP activation {name!r} has no vlp equivalent (supported: {sorted(HF_ACT)})")
    return HF_ACT[name]


def _tower_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """vlp tower sizes of a transformers SigLIP tower config (SiglipConfig's defaults where absent)."""
    return {
        "width": hf.get("hidden_size", 768),
        "layers": hf.get("num_hidden_layers", 12),
        "heads": hf.get("num_attention_heads", 12),
        "mlp_dim": hf.get("intermediate_size", 3072),
        "act": _hf_act(hf.get("hidden_act", "gelu_pytorch_tanh")),
        "eps": hf.get("layer_norm_eps", 1e-6),
        "pre_norm": True,
    }


def _vision(tower: dict[str, Any], image_size: int, patch_size: int) -> dict[str, Any]:
    return {
        **tower,
        "image_size": image_size,
        "patch_size": patch_size,
        "class_token": False,
        "pool": "map",
        "ln_pre": False,
        "patch_bias": True,
        "stem": "patch",
    }


def _text(tower: dict[str, Any], vocab_size: int, context_length: int) -> dict[str, Any]:
    return {
        **tower,
        "vocab_size": vocab_size,
        "context_length": context_length,
        "causal": False,
        "pool": "last",
        "embed_norm": False,
    }


def config_from_hf(hf: dict[str, Any], tokens: dict[str, int]) -> tuple[str, dict[str, Any]]:
    """(recipe, vlp SigLIP config) of a transformers `SiglipConfig` dict."""
    v, t = hf.get("vision_config", {}), hf.get("text_config", {})
    if not v.get("vision_use_head", True):
        raise ValueError("a SigLIP image tower without its attention-pooling head (vision_use_head: false)")
    vision = _tower_from_hf(v)
    if t.get("projection_size", t.get("hidden_size", 768)) != vision["width"]:
        raise ValueError("SigLIP's text projection_size must equal the image tower's hidden_size")
    pad = tokens.get("pad", t.get("pad_token_id", 1))
    return "siglip", {
        "embed_dim": vision["width"],
        "vision": _vision(vision, v.get("image_size", 224), v.get("patch_size", 16)),
        "text": _text(_tower_from_hf(t), t.get("vocab_size", 32000), t.get("max_position_embeddings", 64)),
        "image_proj": False,
        "tokens": {**tokens, "pad": pad},
    }


def _require_siglip(model: Any, target: str) -> None:
    cfg = model.cfg
    v, t = cfg.vision, cfg.text
    require(
        {
            "image_proj": (cfg.image_proj, False),
            "vision.class_token": (v.class_token, False),
            "vision.pool": (v.pool, "map"),
            "vision.ln_pre": (v.ln_pre, False),
            "vision.patch_bias": (v.patch_bias, True),
            "vision.stem": (v.stem, "patch"),
            "vision.pre_norm": (v.pre_norm, True),
            "text.pre_norm": (t.pre_norm, True),
            "text.embed_norm": (t.embed_norm, False),
        },
        target,
    )


def _tower_to_hf(cfg: Any) -> dict[str, Any]:
    return {
        "hidden_size": cfg.width,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.mlp_dim or int(cfg.width * cfg.mlp_ratio),
        "hidden_act": VLP_ACT[cfg.act],
        "layer_norm_eps": cfg.eps,
    }


def config_to_hf(model: Any, architecture: str) -> dict[str, Any]:
    """transformers `SiglipConfig` kwargs of a vlp SigLIP; errors name what it cannot express."""
    _require_siglip(model, "transformers' SiglipModel")
    cfg, tokenizer = model.cfg, model.tokenizer
    v, t = cfg.vision, cfg.text
    text = {
        **_tower_to_hf(t),
        "vocab_size": t.vocab_size,
        "max_position_embeddings": t.context_length,
        "projection_size": cfg.embed_dim,
        "pad_token_id": cfg.tokens.get("pad", 1),
    }
    if tokenizer is not None:
        text["bos_token_id"], text["eos_token_id"] = tokenizer.sot_id, tokenizer.eot_id
    vision = {**_tower_to_hf(v), "image_size": v.image_size, "patch_size": v.patch_size, "vision_use_head": True}
    return {"text_config": text, "vision_config": vision}


def _map_head(vlp_prefix: str, src_prefix: str, names: dict[str, Any]) -> list[Entry]:
    """Entries of the MAP head; `names` gives the source's probe, fused-qkv parts, output
    projection, norm and MLP names."""
    entries = [Entry(f"{vlp_prefix}probe", (src_prefix + names["probe"],))]
    for p in ("weight", "bias"):
        entries.append(Entry(f"{vlp_prefix}qkv.{p}", tuple(src_prefix + k.format(p=p) for k in names["qkv"])))
    pairs_ = [("out", names["out"]), ("norm", names["norm"]), ("mlp.fc1", names["fc1"]), ("mlp.fc2", names["fc2"])]
    return entries + pairs(vlp_prefix, src_prefix, pairs_)


def hf_entries(model: Any, architecture: str = "SiglipModel") -> list[Entry]:
    """vlp SigLIP <-> transformers SiglipModel weight names."""
    cfg = model.cfg
    head = {
        "probe": "probe",
        "qkv": ("attention.in_proj_{p}",),
        "out": "attention.out_proj",
        "norm": "layernorm",
        "fc1": "mlp.fc1",
        "fc2": "mlp.fc2",
    }
    return [
        *pairs("visual.", "vision_model.embeddings.", [("patch_embed", "patch_embedding")]),
        Entry("visual.pos_embed", ("vision_model.embeddings.position_embedding.weight",)),
        *block_entries("visual.transformer.blocks", "vision_model.encoder.layers", cfg.vision.layers, HF_BLOCK),
        *pairs("visual.", "vision_model.", [("norm", "post_layernorm")]),
        *_map_head("visual.head.", "vision_model.head.", head),
        Entry("text.token_embed.weight", ("text_model.embeddings.token_embedding.weight",)),
        Entry("text.pos_embed", ("text_model.embeddings.position_embedding.weight",)),
        *block_entries("text.transformer.blocks", "text_model.encoder.layers", cfg.text.layers, HF_BLOCK),
        *pairs("text.", "text_model.", [("norm", "final_layer_norm")]),
        *pairs("", "text_model.", [("text_proj", "head")]),
        Entry("logit_scale", ("logit_scale",)),
        Entry("logit_bias", ("logit_bias",)),
    ]


# --- open_clip -------------------------------------------------------------------------------------


def is_open_clip_siglip(model_cfg: dict[str, Any]) -> bool:
    """An open_clip model config with SigLIP's logit bias (rather than a CLIP)."""
    return "init_logit_bias" in model_cfg


def _timm_tower(name: str) -> dict[str, Any]:
    """vlp image-tower settings of a registered timm SigLIP ViT (built on the meta device: sizes only)."""
    import timm

    with torch.device("meta"):
        trunk = timm.create_model(name, pretrained=False, num_classes=0)
    block = trunk.blocks[0]
    unsupported = [
        what
        for what, bad in (
            ("class token", trunk.cls_token is not None),
            ("pooling other than map", trunk.global_pool != "map"),
            ("norm_pre", not isinstance(trunk.norm_pre, torch.nn.Identity)),
            ("fc_norm", not isinstance(trunk.fc_norm, torch.nn.Identity)),
            ("layer scale", not isinstance(block.ls1, torch.nn.Identity)),
            ("qk norm", not isinstance(block.attn.q_norm, torch.nn.Identity)),
            ("register tokens", getattr(trunk, "num_reg_tokens", 0)),
        )
        if bad
    ]
    if unsupported:
        raise ValueError(f"timm model {name!r}: vlp's SigLIP image tower has no {', '.join(unsupported)}")
    act = block.mlp.act
    return {
        "width": trunk.embed_dim,
        "layers": len(trunk.blocks),
        "heads": block.attn.num_heads,
        "mlp_dim": block.mlp.fc1.out_features,
        "act": "gelu_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu",
        "eps": block.norm1.eps,
        "pre_norm": True,
        "image_size": trunk.patch_embed.img_size[0],
        "patch_size": trunk.patch_embed.patch_size[0],
    }


def config_from_open_clip(model_cfg: dict[str, Any], tokens: dict[str, int]) -> tuple[str, dict[str, Any]]:
    """(recipe, vlp SigLIP config) of an open_clip SigLIP model config (a timm image tower)."""
    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    if "timm_model_name" not in v or v.get("timm_pool") != "map" or v.get("timm_proj", "linear") != "none":
        raise ValueError("open_clip SigLIP: vlp maps a timm ViT with MAP pooling and no projection (timm_proj: none)")
    if not t.get("no_causal_mask") or t.get("pool_type") != "last" or "hf_model_name" in t:
        raise ValueError("open_clip SigLIP: vlp maps a bidirectional open_clip text tower pooling the last token")
    tower = _timm_tower(v["timm_model_name"])
    image_size, patch_size = tower.pop("image_size"), tower.pop("patch_size")
    if model_cfg["embed_dim"] != tower["width"]:
        raise ValueError("open_clip SigLIP: embed_dim must equal the timm tower's width")
    width = t.get("width", 512)
    approximate = (t.get("act_kwargs") or {}).get("approximate", "none")
    text = {
        "width": width,
        "layers": t.get("layers", 12),
        "heads": t.get("heads", 8),
        "mlp_dim": int(width * t.get("mlp_ratio", 4.0)),
        "act": "gelu_tanh" if approximate == "tanh" else "quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
        "eps": (t.get("norm_kwargs") or {}).get("eps", 1e-5),
        "pre_norm": True,
    }
    return "siglip", {
        "embed_dim": model_cfg["embed_dim"],
        "vision": _vision(tower, v.get("image_size", image_size), patch_size),
        "text": _text(text, t.get("vocab_size", 49408), t.get("context_length", 77)),
        "image_proj": False,
        "init_logit_bias": model_cfg["init_logit_bias"],
        "tokens": {"pad": t.get("pad_id", 0), **tokens},
    }


def open_clip_entries(model: Any, architecture: str = "CustomTextCLIP") -> list[Entry]:
    """vlp SigLIP <-> open_clip CustomTextCLIP (timm image tower) state-dict names."""
    cfg = model.cfg
    head = {
        "probe": "latent",
        "qkv": ("q.{p}", "kv.{p}"),
        "out": "proj",
        "norm": "norm",
        "fc1": "mlp.fc1",
        "fc2": "mlp.fc2",
    }
    trunk = "visual.trunk."
    return [
        *pairs("visual.", trunk, [("patch_embed", "patch_embed.proj")]),
        Entry("visual.pos_embed", (trunk + "pos_embed",)),
        *block_entries("visual.transformer.blocks", trunk + "blocks", cfg.vision.layers, TIMM_BLOCK),
        *pairs("visual.", trunk, [("norm", "norm")]),
        *_map_head("visual.head.", trunk + "attn_pool.", head),
        Entry("text.token_embed.weight", ("text.token_embedding.weight",)),
        Entry("text.pos_embed", ("text.positional_embedding",)),
        *block_entries("text.transformer.blocks", "text.transformer.resblocks", cfg.text.layers, OPEN_CLIP_BLOCK),
        *pairs("text.", "text.", [("norm", "ln_final")]),
        *pairs("", "text.", [("text_proj", "text_projection")]),
        Entry("logit_scale", ("logit_scale",)),
        Entry("logit_bias", ("logit_bias",)),
    ]


def _may_match(name: str, patch_size: int, image_size: int) -> bool:
    """Whether a timm name could be this tower, by what the name says (`..._patch16_..._224`):
    building each candidate takes a third of a second even on the meta device."""
    patch, size = re.search(r"patch(\d+)", name), re.search(r"_(\d+)$", name)
    return (
        "naflex" not in name
        and "_gap" not in name
        and (patch is None or int(patch.group(1)) == patch_size)
        and (size is None or int(size.group(1)) == image_size)
    )


def timm_name_for(model: Any) -> str:
    """The registered timm SigLIP ViT whose shape is `model`'s image tower (open_clip names its
    image tower by it); an error when none is."""
    import timm

    v = model.cfg.vision
    want = {
        "width": v.width,
        "layers": v.layers,
        "heads": v.heads,
        "mlp_dim": v.mlp_dim or int(v.width * v.mlp_ratio),
        "act": v.act,
        "eps": v.eps,
        "pre_norm": True,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
    }
    for name in timm.list_models("*siglip*"):
        if not _may_match(name, v.patch_size, v.image_size):
            continue
        try:
            if _timm_tower(name) == want:
                return name
        except (ValueError, AttributeError, TypeError):  # not a plain ViT (e.g. NaFlex variants)
            continue
    raise ValueError(f"no registered timm SigLIP ViT has this image tower ({want}); open_clip cannot name it")


def config_to_open_clip(model: Any) -> dict[str, Any]:
    """open_clip `model_cfg` of a vlp SigLIP (its image tower must match a timm model)."""
    _require_siglip(model, "open_clip SigLIP")
    cfg = model.cfg
    v, t = cfg.vision, cfg.text
    if t.act not in ("gelu", "gelu_tanh") or t.mlp_dim not in (0, 4 * t.width):
        raise ValueError("open_clip's text tower has a GELU (exact or tanh) and an MLP of 4 x width")
    text = {
        "context_length": t.context_length,
        "vocab_size": t.vocab_size,
        "width": t.width,
        "heads": t.heads,
        "layers": t.layers,
        "no_causal_mask": True,
        "proj_bias": True,
        "pool_type": "last",
        "pad_id": cfg.tokens.get("pad", 0),
        "norm_kwargs": {"eps": t.eps},
    }
    if t.act == "gelu_tanh":
        text["act_kwargs"] = {"approximate": "tanh"}
    return {
        "embed_dim": cfg.embed_dim,
        "init_logit_bias": cfg.init_logit_bias,
        "custom_text": True,
        "vision_cfg": {
            "image_size": v.image_size,
            "timm_model_name": timm_name_for(model),
            "timm_model_pretrained": False,
            "timm_pool": "map",
            "timm_proj": "none",
        },
        "text_cfg": text,
    }
