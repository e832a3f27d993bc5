"""CLIP checkpoints: Hugging Face `CLIPModel` and open_clip `CLIP` (ViT or ResNet image tower).

Both are vlp's CLIP with pre-LN blocks, `ln_pre` on the image tokens, class-token pooling and
EOS pooling of a causal text tower; what differs is configuration (activation: `quick_gelu`
for OpenAI's weights, LayerNorm eps, MLP width) and weight names. Text pooling: vlp pools the
last real token of a right-padded row, HF the first `eos_token_id` (or, in legacy configs, the
highest id), open_clip the highest id; all three pick the end-of-text token of a tokenized
caption, which is what the tokenizers produce.

open_clip's ResNet towers (RN50, RN101, RN50x4, ...) are vlp's `vision.kind: resnet`
(`vlp.nn.resnet`): the same layers under other names; BatchNorm running statistics are weights
here. transformers has no CLIP ResNet, so a ResNet CLIP loads from and saves to open_clip only.
"""

from __future__ import annotations

from typing import Any

from vlp.interop.mapping import (
    Entry,
    block_entries,
    pairs,
    require,
    tower_from_hf,
    tower_to_hf,
)

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


OPEN_CLIP_CONFIG = "open_clip_config.json"


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
            "vision.kind": (v.kind, "vit"),  # transformers has no CLIP ResNet
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
    if "timm_model_name" in v or "hf_model_name" in t:
        raise ValueError(
            "only open_clip's own image towers (ViT, ResNet) and text tower are supported "
            "(not timm or Hugging Face towers)"
        )
    resnet = isinstance(v.get("layers"), (list, tuple))
    unsupported = (
        []
        if resnet
        else [
            k
            for k in (
                "attentional_pool",
                "no_ln_pre",
                "final_ln_after_pool",
                "ls_init_value",
                "pos_embed_type",
            )
            if v.get(k) not in (None, False, 0, 0.0, "learnable")
        ]
    )
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
    text = {
        "width": tw,
        "layers": t.get("layers", 12),
        "heads": t.get("heads", 8),
        "mlp_dim": int(tw * t.get("mlp_ratio", 4.0)),
    }
    common = {"act": "quick_gelu" if model_cfg.get("quick_gelu") else "gelu", "eps": 1e-5, "pre_norm": True}
    if resnet:  # ModifiedResNet: stem width, blocks per stage, attention-pool heads of head_width
        vision = {
            "kind": "resnet",
            "width": vw,
            "stages": list(v["layers"]),
            "heads": vw * 32 // v.get("head_width", 64),
        }
    else:
        vision = {
            "width": vw,
            "layers": v.get("layers", 12),
            "heads": vw // v.get("head_width", 64),
            "mlp_dim": int(vw * v.get("mlp_ratio", 4.0)),
            **common,
            "patch_size": v.get("patch_size", 16),
            "pool": "cls",
            "ln_pre": True,
            "patch_bias": False,
            "stem": "patch",
            "patch_dropout": float(v.get("patch_dropout") or 0.0),  # FLIP; training only
        }
    vision["image_size"] = _square(v.get("image_size", 224))
    return "clip", {
        "embed_dim": model_cfg["embed_dim"],
        "vision": vision,
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


def _square(size: Any) -> int:
    """open_clip's image_size (an int or [height, width]) as vlp's one side."""
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"open_clip image_size {list(size)}: vlp reads square images only")
        return size[0]
    return size


BATCH_NORM = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")  # all in the state dict
RESNET_CONVS = tuple((f"conv{i}", f"norm{i}", f"conv{i}", f"bn{i}") for i in (1, 2, 3))  # vlp conv, norm; open_clip's


def _conv_norm(vlp: str, src: str, conv: str, norm: str, src_conv: str, src_norm: str) -> list[Entry]:
    return [
        Entry(f"{vlp}{conv}.weight", (f"{src}{src_conv}.weight",)),
        *pairs(vlp, src, [(norm, src_norm)], BATCH_NORM),
    ]


def resnet_entries(stages: tuple[int, ...]) -> list[Entry]:
    """vlp `ModifiedResNet` <-> open_clip `ModifiedResNet` names, both under `visual.`: the stem,
    `stages.i.j` = `layer{i+1}.j` (the first block of each stage has a shortcut convolution,
    open_clip's `downsample`), and the attention pool, whose separate k and v projections vlp
    keeps as one `kv`."""
    entries = [e for names in RESNET_CONVS for e in _conv_norm("visual.", "visual.", *names)]
    for i, blocks in enumerate(stages):
        for j in range(blocks):
            vlp, src = f"visual.stages.{i}.{j}.", f"visual.layer{i + 1}.{j}."
            entries += [e for names in RESNET_CONVS for e in _conv_norm(vlp, src, *names)]
            if j == 0:
                entries += _conv_norm(vlp, src, "shortcut.1", "shortcut.2", "downsample.0", "downsample.1")
    pool, src = "visual.attn_pool.", "visual.attnpool."
    return [
        *entries,
        Entry(pool + "pos_embed", (src + "positional_embedding",)),
        *pairs(pool, src, [("q", "q_proj"), ("out", "c_proj")]),
        *(Entry(f"{pool}kv.{p}", (f"{src}k_proj.{p}", f"{src}v_proj.{p}")) for p in ("weight", "bias")),
    ]


def open_clip_entries(model: Any, architecture: str = "CLIP") -> list[Entry]:
    """vlp CLIP <-> open_clip CLIP state-dict names (projections stored as x @ W)."""
    cfg = model.cfg
    if cfg.vision.kind == "resnet":  # the attention pool projects to the embedding: no visual.proj
        visual = resnet_entries(cfg.vision.stages)
    else:
        visual = [
            Entry("visual.cls_token", ("visual.class_embedding",)),
            Entry("visual.patch_embed.weight", ("visual.conv1.weight",)),
            Entry("visual.pos_embed", ("visual.positional_embedding",)),
            *pairs("visual.", "visual.", [("norm_pre", "ln_pre"), ("norm", "ln_post")]),
            *block_entries(
                "visual.transformer.blocks", "visual.transformer.resblocks", cfg.vision.layers, OPEN_CLIP_BLOCK
            ),
            Entry("image_proj.weight", ("visual.proj",), transpose=True),
        ]
    return [
        *visual,
        Entry("text.token_embed.weight", ("token_embedding.weight",)),
        Entry("text.pos_embed", ("positional_embedding",)),
        *block_entries("text.transformer.blocks", "transformer.resblocks", cfg.text.layers, OPEN_CLIP_BLOCK),
        *pairs("text.", "", [("norm", "ln_final")]),
        Entry("text_proj.weight", ("text_projection",), transpose=True),
        Entry("logit_scale", ("logit_scale",)),
    ]


def _mlp_ratio(cfg: Any, where: str) -> float:
    """open_clip's mlp_ratio for a vlp tower; open_clip builds int(width x ratio) hidden units."""
    hidden = cfg.mlp_dim or int(cfg.width * cfg.mlp_ratio)
    ratio = hidden / cfg.width
    if int(cfg.width * ratio) != hidden:
        raise ValueError(f"open_clip cannot express {where} MLP width {hidden} as width {cfg.width} x a ratio")
    return ratio


def config_to_open_clip(model: Any) -> dict[str, Any]:
    """open_clip `model_cfg` of a vlp CLIP (ViT or ResNet image tower); errors name what open_clip
    cannot express. open_clip has one activation flag (`quick_gelu`) for both towers."""
    cfg = model.cfg
    v, t = cfg.vision, cfg.text
    settings = {
        "text.pre_norm": (t.pre_norm, True),
        "text.causal": (t.causal, True),
        "text.pool": (t.pool, "eos"),
        "text.embed_norm": (t.embed_norm, False),
        "text.eps": (t.eps, 1e-5),
    }
    if t.act not in ("gelu", "quick_gelu"):
        raise ValueError(f"open_clip's CLIP has a GELU or QuickGELU, not text.act {t.act!r}")
    if v.kind == "resnet":
        require(settings, "open_clip's CLIP")
        vision = {
            "image_size": v.image_size,
            "layers": list(v.stages),
            "width": v.width,
            "head_width": v.width * 32 // v.heads,
        }
    else:
        settings.update(
            {
                "vision.kind": (v.kind, "vit"),
                "vision.pool": (v.pool, "cls"),
                "vision.class_token": (v.class_token, True),
                "vision.ln_pre": (v.ln_pre, True),
                "vision.patch_bias": (v.patch_bias, False),
                "vision.stem": (v.stem, "patch"),
                "vision.pre_norm": (v.pre_norm, True),
                "vision.eps": (v.eps, 1e-5),
                "vision.act": (v.act, t.act),
            }
        )
        require(settings, "open_clip's CLIP")
        if v.width % v.heads:
            raise ValueError(f"vision width {v.width} is not divisible by {v.heads} heads")
        vision = {
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "width": v.width,
            "layers": v.layers,
            "head_width": v.width // v.heads,
            "mlp_ratio": _mlp_ratio(v, "the vision"),
        }
    text = {
        "context_length": t.context_length,
        "vocab_size": t.vocab_size,
        "width": t.width,
        "heads": t.heads,
        "layers": t.layers,
        "mlp_ratio": _mlp_ratio(t, "the text"),
    }
    return {"embed_dim": cfg.embed_dim, "quick_gelu": t.act == "quick_gelu", "vision_cfg": vision, "text_cfg": text}
