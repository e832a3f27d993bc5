"""Caption generation: vlp's BLIP decoder against transformers' `BlipForConditionalGeneration`
`generate`, holding the same weights (written by `vlp.save(..., format="hf", task="captioning")`),
greedy and beam search (3 beams), batch 1 and 16, 20 new tokens. The tokens are compared first
(identical, or the row says how many sequences differ); then tokens/s, alternating repetitions.

    .venv/bin/python bench/generation_hf.py [--reps 5] [--out rows.json]
"""

from __future__ import annotations

import tempfile

import torch
from blip_tiny import TOKENS  # noqa: E402  (bench/ is the script's folder)
from clip_tiny import bench_arguments, compare, report
from transformers import BlipForConditionalGeneration

import vlp
from vlp.config import load_run_config
from vlp.data.tokenizer import Tokenizer

VOCAB = 512
NEW_TOKENS = 20


def hf_compatible_blip(contrastive: dict | None = None) -> tuple[torch.nn.Module, object]:
    """vlp's tiny BLIP with the ViT flavour transformers has (no ln_pre, a patch bias), and its
    run config; `contrastive` overrides that section (momentum 0: no momentum encoders)."""
    cfg = load_run_config("blip")
    torch.manual_seed(0)
    vision = {**cfg.model["vision"], "ln_pre": False, "patch_bias": True}
    model = vlp.create_model(
        "blip",
        {
            **cfg.model,
            "vision": vision,
            "tokens": TOKENS,
            "contrastive": {**cfg.model["contrastive"], **(contrastive or {})},
            "text": {**cfg.model["text"], "vocab_size": VOCAB},
        },
    )
    model.tokenizer = Tokenizer.train([f"word{i}" for i in range(VOCAB)], vocab_size=VOCAB)  # ids only
    return model, cfg


def transformers_twin(model: torch.nn.Module, cls: type) -> torch.nn.Module:
    """transformers' `cls` (a BLIP task model) holding `model`'s weights, via `vlp.save`."""
    task = "captioning" if cls is BlipForConditionalGeneration else "retrieval"
    with tempfile.TemporaryDirectory() as tmp:
        vlp.save(model, tmp, format="hf", task=task)
        return cls.from_pretrained(tmp)


def main() -> None:
    args = bench_arguments(__doc__, batch=16, reps=5, warmup=1)
    model, cfg = hf_compatible_blip()
    model.eval()
    hf = transformers_twin(model, BlipForConditionalGeneration).eval()
    size = cfg.model["vision"]["image_size"]
    rows = []
    for batch in (1, 16):
        images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        for method, beams in (("greedy", 1), ("beam", 3)):
            options = {"max_new_tokens": NEW_TOKENS} | ({"num_beams": beams} if method == "beam" else {})
            with torch.no_grad():
                ours = model.generate(images, method=method, **options)
                theirs = hf.generate(pixel_values=images, do_sample=False, num_beams=beams, max_new_tokens=NEW_TOKENS)
            length = min(ours.shape[1], theirs.shape[1])
            differ = int((ours[:, :length] != theirs[:, :length]).any(dim=1).sum())
            fns = {
                "vlp": lambda: model.generate(images, method=method, **options),
                "transformers": lambda: hf.generate(
                    pixel_values=images, do_sample=False, num_beams=beams, max_new_tokens=NEW_TOKENS
                ),
            }
            with torch.no_grad():
                row = compare(
                    f"{method} (beams {beams}), batch {batch} (tokens/s)",
                    fns,
                    args.reps,
                    args.warmup,
                    args.precision,
                    batch * NEW_TOKENS,
                    baseline="transformers",
                )
            rows.append({**row, "sequences_differing": differ})
    report(rows, args.out)


if __name__ == "__main__":
    main()
