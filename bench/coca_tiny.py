"""Tiny CoCa: vlp's training step against open_clip's CoCa, and CoCa's single pass against
BLIP's three passes, in one process with alternating repetitions (medians, ratios).

- CoCa step (ITC + 2 x captioning, forward + backward + AdamW) of vlp and of open_clip's `CoCa`
  + `CoCaLoss` at the sizes of configs/coca/tiny.yaml (ViT 64 px / patch 8 / width 192 / 4 layers;
  2 unimodal + 2 multimodal text layers of width 128; 16 captioning queries, 1 contrastive);
- the cost of a step of vlp's CoCa vs vlp's BLIP (configs/blip/tiny.yaml): one pass of each text
  stack against one ViT pass and three text passes (ITC, ITM on 3B pairs, LM).

    .venv/bin/python bench/coca_tiny.py [--batch 64] [--reps 5] [--precision fp32|bf16]
"""

from __future__ import annotations

import torch
from clip_tiny import bench_arguments, compare, report, vocab_batch  # noqa: E402  (bench/ is the script's folder)
from open_clip.coca_model import CoCa, MultimodalCfg
from open_clip.loss import CoCaLoss
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

import vlp
from vlp.config import load_run_config
from vlp.data.tokenizer import SPECIAL_TOKENS

VOCAB = 512
TOKENS = {
    name: SPECIAL_TOKENS.index(token)
    for name, token in (
        ("pad", "[PAD]"),
        ("cls", "[CLS]"),
        ("sep", "[SEP]"),
        ("enc", "[ENC]"),
        ("dec", "[DEC]"),
        ("sot", "<|startoftext|>"),
        ("eot", "<|endoftext|>"),
    )
}


def vlp_model(recipe: str):
    cfg = load_run_config(recipe)
    return vlp.create_model(
        recipe, {**cfg.model, "text": {**cfg.model["text"], "vocab_size": VOCAB}, "tokens": TOKENS}
    ), cfg


def open_clip_coca(cfg):
    m = cfg.model
    v, t = m["vision"], m["text"]
    vision = CLIPVisionCfg(
        layers=v["layers"],
        width=v["width"],
        head_width=v["width"] // v["heads"],
        patch_size=v["patch_size"],
        image_size=v["image_size"],
        attentional_pool=True,
        attn_pooler_queries=m["caption_queries"],
        attn_pooler_heads=t["heads"],
        output_tokens=True,
    )
    text = CLIPTextCfg(
        context_length=t["context_length"],
        vocab_size=VOCAB,
        width=t["width"],
        heads=t["heads"],
        layers=t["layers"],
        embed_cls=True,
        output_tokens=True,
    )
    multimodal = MultimodalCfg(
        context_length=t["context_length"],
        vocab_size=VOCAB,
        width=t["width"],
        heads=t["heads"],
        layers=m["multimodal_layers"],
    )
    return CoCa(m["embed_dim"], multimodal, text, vision)


def step(loss_fn, model, optimizer):
    def run():
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def main() -> None:
    args = bench_arguments(__doc__, batch=64, reps=5, warmup=1)
    torch.manual_seed(0)
    coca, cfg = vlp_model("coca")
    blip, _ = vlp_model("blip")
    reference = open_clip_coca(cfg)
    weights = cfg.train.loss_weights
    # open_clip pads its text to the context and appends [CLS]: give it context - 1 tokens.
    b = vocab_batch(cfg, args.batch, VOCAB, length=cfg.model["text"]["context_length"] - 1)
    optimizers = {
        name: torch.optim.AdamW(m.parameters(), lr=1e-4)
        for name, m in (("vlp", coca), ("open_clip", reference), ("blip", blip))
    }
    coca_loss = CoCaLoss(caption_loss_weight=weights.get("caption", 2.0), clip_loss_weight=weights.get("itc", 1.0))

    def vlp_loss():
        losses = coca(b)
        return sum(weights.get(k, 1.0) * v for k, v in losses.items())

    def open_clip_loss():
        out = reference(b["images"], b["input_ids"])
        clip_loss, caption_loss = coca_loss(
            out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"]
        )  # already weighted
        return clip_loss + caption_loss

    rows = [
        compare(
            "CoCa train step (samples/s)",
            {
                "vlp": step(vlp_loss, coca, optimizers["vlp"]),
                "open_clip": step(open_clip_loss, reference, optimizers["open_clip"]),
            },
            args.reps,
            args.warmup,
            args.precision,
            args.batch,
        ),
        compare(
            "step: vlp CoCa (one pass per stack) vs vlp BLIP (three text passes), samples/s",
            {
                "vlp": step(vlp_loss, coca, optimizers["vlp"]),
                "blip": step(lambda: sum(blip(b).values()), blip, optimizers["blip"]),
            },
            args.reps,
            args.warmup,
            args.precision,
            args.batch,
            baseline="blip",
        ),
    ]
    report(rows, args.out)


if __name__ == "__main__":
    main()
