"""Tiny BLIP: the training step against a naive three-forward step, and generation with and
without the KV cache, in one process with alternating repetitions (medians, ratios).

- step: vlp's BLIP step (one ViT pass shared by ITC, ITM and LM) vs. the same model run as
  three independent forwards, each recomputing the image encoder (what three separate
  objective modules would do);
- generation: greedy captions, batch 16, 20 new tokens, with the KV cache vs. re-running the
  whole prefix at every step (the tokens are asserted identical).

    .venv/bin/python bench/blip_tiny.py [--batch 64] [--reps 5] [--precision fp32|bf16]
"""

from __future__ import annotations

import math

import torch
from clip_tiny import bench_arguments, compare, report, vocab_batch  # noqa: E402  (bench/ is the script's folder)

import vlp
from vlp.config import load_run_config
from vlp.data.tokenizer import SPECIAL_TOKENS
from vlp.generate import Recomputing, greedy
from vlp.models.blip import GroundedDecoder
from vlp.nn.attention import KVCache

TOKENS = {
    name: SPECIAL_TOKENS.index(token)
    for name, token in zip(("pad", "unk", "cls", "sep", "mask", "enc", "dec"), SPECIAL_TOKENS)
}


def bert_batch(cfg, size: int) -> dict[str, torch.Tensor]:
    """Random images and 16-token texts framed by [CLS] ... [SEP] (512-token vocabulary)."""
    batch = vocab_batch(cfg, size, vocab=512, length=16)
    batch["input_ids"][:, 0], batch["input_ids"][:, -1] = TOKENS["cls"], TOKENS["sep"]
    return batch


def checked_steps(models: dict[str, torch.nn.Module], batch: dict) -> tuple[dict, dict]:
    """A training step (forward, backward, AdamW) per model on `batch`, and each model's losses,
    asserted equal (to 1e-4) across the models with the same random draws (hard negatives)."""
    losses = {}
    for name, model in models.items():
        torch.manual_seed(1)
        losses[name] = {k: v.item() for k, v in model(batch).items()}
    first, *others = losses.values()
    for other in others:
        for key, value in first.items():
            assert math.isclose(value, other[key], abs_tol=1e-4), (key, losses)

    def train(model: torch.nn.Module):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            sum(model(batch).values()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    return {name: train(model) for name, model in models.items()}, losses


def naive_step(model, batch):
    """ITC, ITM and LM as three separate forwards, each with its own ViT pass."""
    losses = {}
    for objective in ("itc", "itm", "lm"):
        model.cfg.objectives = (objective,) if objective != "itm" else ("itc", "itm")
        losses[objective] = model(batch)[objective]
    model.cfg.objectives = ("itc", "itm", "lm")
    return sum(losses.values())


def recomputed_logits(model):
    """The decoder without a cache: every step re-runs the whole prefix."""

    def logits(prefix, image_tokens):
        return model.lm_head(model.decoder(prefix, torch.ones_like(prefix), context=image_tokens)[1][:, -1])

    return logits


def main() -> None:
    args = bench_arguments(__doc__, batch=64, reps=5, warmup=1)
    cfg = load_run_config("blip")
    torch.manual_seed(0)
    model_cfg = {**cfg.model, "text": {**cfg.model["text"], "vocab_size": 512}, "tokens": TOKENS}
    model = vlp.create_model("blip", model_cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = bert_batch(cfg, args.batch)

    def train(loss_fn):
        def step():
            loss_fn().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    steps = {"vlp": train(lambda: sum(model(batch).values())), "naive": train(lambda: naive_step(model, batch))}
    rows = [
        compare(
            "BLIP train step (samples/s)", steps, args.reps, args.warmup, args.precision, args.batch, baseline="naive"
        )
    ]

    model.eval()
    images = batch["images"][:16]  # 16 captions (fewer with --batch below 16)
    start = torch.full((len(images), 1), TOKENS["dec"])
    with torch.no_grad():
        image_tokens = model.visual(images)[1]
    options = dict(max_new_tokens=20, min_new_tokens=20, eos_id=TOKENS["sep"], pad_id=TOKENS["pad"])
    cached = greedy(GroundedDecoder(model), start, (KVCache(), image_tokens, None), **options)
    uncached = greedy(Recomputing(recomputed_logits(model)), start, (None, image_tokens), **options)
    assert torch.equal(cached, uncached), "KV-cache decoding must give the same tokens"
    decode = {
        "vlp": lambda: greedy(GroundedDecoder(model), start, (KVCache(), image_tokens, None), **options),
        "naive": lambda: greedy(Recomputing(recomputed_logits(model)), start, (None, image_tokens), **options),
    }
    rows.append(
        compare(
            "greedy generation, batch 16 (tokens/s)",
            decode,
            args.reps,
            args.warmup,
            args.precision,
            len(images) * 20,
            baseline="naive",
        )
    )
    report(rows, args.out)


if __name__ == "__main__":
    main()
