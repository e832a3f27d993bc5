"""BLIP-2 checkpoints of transformers, both ways: `Blip2ForConditionalGeneration` with a
decoder-only LM (OPT) or an encoder-decoder one (Flan-T5) is vlp's `blip2_stage2`;
`Blip2ForImageTextRetrieval` (the Q-Former with its ITC and ITM heads) is `blip2_stage1`.

The image tower is BLIP's (pre-LN, no `ln_pre`, a patch bias); transformers keeps the tower
whose last block BLIP-2 dropped, and its `post_layernorm` is the paper's `ln_vision`, so vlp
runs every block without its own final norm (`vision_layers` = all of them). The Q-Former of a
stage-2 checkpoint holds only the query stream: no word embeddings and no text feed-forward
weights, which are absent rather than missing. The language model is rebuilt from the
checkpoint's `text_config` with transformers and given its `language_model.*` weights.

Saving writes only the blocks vlp runs: a vlp tower read at its penultimate block (`vision_layers:
-1`) loses its unused last block and final norm, as the paper's released weights did. A stage-1
model trained with ITG keeps its text-generation head in the vlp run only: transformers' retrieval
model has none (a warning names it).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from vlp.interop.blip import VISION_BLOCK
from vlp.interop.mapping import CheckpointMismatch, Entry, block_entries, pairs, require, tower_from_hf, tower_to_hf

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
TEXT_BLOCK = {  # the Q-Former's text stream: its own feed-forward weights (retrieval checkpoints)
    "mlp.fc1.{p}": "intermediate.dense.{p}",
    "mlp.fc2.{p}": "output.dense.{p}",
    "norm2.{p}": "output.LayerNorm.{p}",
}
LM_PREFIX = "language_model."
GENERATION, RETRIEVAL = "Blip2ForConditionalGeneration", "Blip2ForImageTextRetrieval"
RECIPES = {GENERATION: "blip2_stage2", RETRIEVAL: "blip2_stage1"}


def architecture(hf: dict[str, Any] | None = None) -> str:
    """The transformers class of a `Blip2Config` dict (its `architectures`; captioning if unnamed)."""
    name = ((hf or {}).get("architectures") or [GENERATION])[0]
    if name not in RECIPES:
        raise ValueError(f"BLIP-2 architecture {name!r} is not supported; vlp loads {sorted(RECIPES)}")
    return name


def architecture_for(model: Any, task: str | None = None) -> str:
    """The transformers class a vlp BLIP-2 saves as: stage 1 as the retrieval model, stage 2 as
    the captioning one. Stage 1's ITG head has no place there: saving it without
    task="retrieval" warns that it stays behind."""
    if model.recipe == "blip2_stage2":
        if task not in (None, "captioning"):
            raise ValueError(f"a BLIP-2 stage-2 model saves as {GENERATION} (task 'captioning'), not {task!r}")
        return GENERATION
    if task not in (None, "retrieval"):
        raise ValueError(f"a BLIP-2 stage-1 model saves as {RETRIEVAL} (task 'retrieval'), not {task!r}")
    if task is None and "itg" in model.objectives:
        warnings.warn(
            f"transformers' {RETRIEVAL} has no image-grounded text generation (ITG) head: its "
            "weights (lm_head.dense, lm_head.norm, lm_head.decoder.bias) and the ITC temperature "
            "(logit_scale) are not saved; the vlp run keeps them (task='retrieval' silences this)",
            stacklevel=4,
        )
    return RETRIEVAL


def vision_blocks(cfg: Any) -> int:
    """How many blocks of the frozen image tower BLIP-2 runs (`vision_layers`, -1: all but the last)."""
    return cfg.vision_layers if cfg.vision_layers > 0 else cfg.vision.layers + cfg.vision_layers


def config_from_hf(hf: dict[str, Any], tokens: dict[str, int]) -> tuple[str, dict[str, Any]]:
    """(recipe, vlp config) of a transformers `Blip2Config` dict: stage 2 for the captioning
    model (any LM, decoder-only or encoder-decoder), stage 1 with ITC and ITM for retrieval."""
    v, q = hf["vision_config"], hf["qformer_config"]
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
    common = {"vision": vision, "vision_layers": v["num_hidden_layers"], "qformer": qformer, "tokens": tokens}
    if architecture(hf) == RETRIEVAL:
        return "blip2_stage1", {
            **common,
            "embed_dim": hf.get("image_text_hidden_size", 256),
            "objectives": ["itc", "itm"],
        }
    return "blip2_stage2", {**common, "image_token": hf.get("image_token_index")}


def uses_vlp_tokenizer(hf: dict[str, Any]) -> bool:
    """A retrieval checkpoint's tokenizer is the Q-Former's (vlp's); a captioning one's is its LM's."""
    return architecture(hf) == RETRIEVAL


def build(
    model_cls: type,
    cfg: Any,
    hf: dict[str, Any],
    path: Path,
    source: dict[str, torch.Tensor],
    tokenizer: Any = None,
) -> Any:
    """The vlp model; for stage 2 with its frozen LM (causal or seq2seq) rebuilt from
    `text_config`, the LM's weights taken out of `source` (what is left maps to the vlp modules)."""
    if architecture(hf) == RETRIEVAL:
        return model_cls(cfg, tokenizer)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    text = dict(hf["text_config"])
    lm_config = AutoConfig.for_model(text.pop("model_type"), **text)
    lm = (AutoModelForSeq2SeqLM if lm_config.is_encoder_decoder else AutoModelForCausalLM).from_config(lm_config)
    weights = {k[len(LM_PREFIX) :]: source.pop(k) for k in [k for k in source if k.startswith(LM_PREFIX)]}
    missing, unexpected = lm.load_state_dict(weights, strict=False)
    # Tied weights (OPT's output layer, T5's encoder and decoder embeddings) are stored once.
    params = dict(lm.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in weights if k in params}
    missing = [k for k in missing if k not in params or id(params[k]) not in loaded]
    if missing or unexpected:
        raise CheckpointMismatch(f"{path}: language model missing {missing[:8]}, unexpected {unexpected[:8]}")
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "vocab.json"))
    return model_cls(
        cfg, lm=lm.eval(), lm_tokenizer=AutoTokenizer.from_pretrained(str(path)) if has_tokenizer else None
    )


def hf_entries(model: Any, architecture: str = GENERATION) -> list[Entry]:
    """vlp BLIP-2 stage 2 <-> transformers Blip2ForConditionalGeneration (without the LM), or
    stage 1 <-> Blip2ForImageTextRetrieval (with the Q-Former's text stream and ITC/ITM heads)."""
    cfg, v = model.cfg, "vision_model."
    q = cfg.qformer
    crossing = range(0, q.layers, q.cross_attention_every)
    blocks = "qformer.text.transformer.blocks"
    if architecture == RETRIEVAL:
        heads = [
            Entry("qformer.text.token_embed.weight", ("embeddings.word_embeddings.weight",)),
            Entry("qformer.text.pos_embed", ("embeddings.position_embeddings.weight",)),
            *block_entries(blocks, "qformer.encoder.layer", q.layers, TEXT_BLOCK),
            *pairs("", "", [("vision_proj", "vision_projection"), ("text_proj", "text_projection")]),
            *pairs("", "", [("itm_head", "itm_head")]),
        ]
    else:
        heads = pairs("", "", [("language_projection", "language_projection")])
    return [
        Entry("visual.cls_token", (v + "embeddings.class_embedding",)),
        *pairs("visual.", v + "embeddings.", [("patch_embed", "patch_embedding")]),
        Entry("visual.pos_embed", (v + "embeddings.position_embedding",)),
        *block_entries("visual.transformer.blocks", v + "encoder.layers", vision_blocks(cfg), VISION_BLOCK),
        *pairs("", v, [("ln_vision", "post_layernorm")]),
        Entry("qformer.query_tokens", ("query_tokens",)),
        *pairs("qformer.text.", "qformer.", [("embed_norm", "layernorm")]),
        *block_entries("qformer.text.transformer.blocks", "qformer.encoder.layer", q.layers, QFORMER_BLOCK),
        *[
            e
            for e in block_entries("qformer.text.transformer.blocks", "qformer.encoder.layer", q.layers, CROSS_BLOCK)
            if int(e.vlp.split(".")[4]) in crossing
        ],
        *heads,
    ]


def absent(model: Any, architecture: str = GENERATION) -> tuple[str, ...]:
    """The tower's final norm, which no checkpoint holds; a retrieval checkpoint has no ITG head
    nor temperature, a stage-2 checkpoint no text stream in its Q-Former."""
    if architecture == RETRIEVAL:
        return ("visual.norm.", "logit_scale", "lm_head.")
    blocks = "qformer.text.transformer.blocks"
    return (
        "visual.norm.",
        "qformer.text.token_embed.",
        "qformer.text.pos_embed",
        *[f"{blocks}.{i}.{part}." for i in range(model.cfg.qformer.layers) for part in ("mlp", "norm2")],
    )


def config_to_hf(model: Any, architecture: str) -> dict[str, Any]:
    """transformers `Blip2Config` kwargs of a vlp BLIP-2; errors name what BLIP-2 cannot express."""
    cfg = model.cfg
    v, q = cfg.vision, cfg.qformer
    require(
        {
            "vision.pre_norm": (v.pre_norm, True),
            "vision.ln_pre": (v.ln_pre, False),
            "vision.patch_bias": (v.patch_bias, True),
            "vision.class_token": (v.class_token, True),
            "vision.stem": (v.stem, "patch"),
            "qformer.pre_norm": (q.pre_norm, False),
            "qformer.embed_norm": (q.embed_norm, True),
            "qformer.cross_attention_from": (q.cross_attention_from, 0),
        },
        "transformers' BLIP-2",
    )
    vision = {
        **tower_to_hf(v),
        "num_hidden_layers": vision_blocks(cfg),  # the blocks BLIP-2 runs; the rest are never used
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "qkv_bias": True,
    }
    qformer = {
        **tower_to_hf(q),
        "vocab_size": q.vocab_size,
        "max_position_embeddings": q.context_length,
        "cross_attention_frequency": q.cross_attention_every,
        "encoder_hidden_size": v.width,
        "use_qformer_text_input": architecture == RETRIEVAL,
        "pad_token_id": cfg.tokens.get("pad", 0),
    }
    out = {"vision_config": vision, "qformer_config": qformer, "num_query_tokens": q.num_queries}
    if architecture == RETRIEVAL:
        return {**out, "image_text_hidden_size": cfg.embed_dim, "architectures": [RETRIEVAL]}
    text = model.lm.config.to_dict()
    return {**out, "text_config": text, "image_token_index": image_token(model), "architectures": [GENERATION]}


def image_token(model: Any) -> int:
    """The LM token id transformers fills with the visual prompt: the loaded checkpoint's, else
    the LM tokenizer's "<image>"; a model with neither must be given one (`cfg.image_token`)."""
    if model.cfg.image_token is not None:
        return model.cfg.image_token
    tok = model.lm_tokenizer
    if tok is not None and "<image>" in tok.get_vocab():
        return tok.convert_tokens_to_ids("<image>")
    raise ValueError(
        "transformers' BLIP-2 puts the visual prompt where the LM's input holds an image token "
        "(image_token_index), and this LM has none: set model.cfg.image_token to the id of a token "
        "the texts never contain (an unused special token) before saving"
    )


def lm_state(model: Any, architecture: str) -> dict[str, torch.Tensor]:
    """The frozen LM's weights under transformers' names (stage 2 keeps it outside its state dict)."""
    if architecture == RETRIEVAL:
        return {}
    return {LM_PREFIX + k: v for k, v in model.lm.state_dict().items()}


def write_tokenizer(model: Any, out: Path) -> None:
    """Stage 2: the LM's tokenizer (what transformers' BLIP-2 reads); stage 1: the Q-Former's."""
    if model.recipe == "blip2_stage2":
        if model.lm_tokenizer is not None:
            model.lm_tokenizer.save_pretrained(out)
    elif model.tokenizer is not None:
        model.tokenizer.save(out / "tokenizer.json")
