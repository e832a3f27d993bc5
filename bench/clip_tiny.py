"""Tiny-CLIP throughput, vlp side by side with open_clip (and, for the encoders, transformers'
CLIPModel holding the same weights) in one process.

Same architecture sizes (configs/clip/tiny.yaml), same batch; each library steps AdamW as its
training code builds it (vlp: the fused kernel; open_clip: torch's default); repetitions
alternate between the two libraries and the medians are compared, so machine noise hits both.

    .venv/bin/python bench/clip_tiny.py [--batch 128] [--reps 7] [--precision fp32|bf16] [--size tiny|small]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import open_clip
import torch
from open_clip.loss import ClipLoss
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

import vlp
from vlp.config import load_run_config, recipe_config_path
from vlp.train.optim import build_optimizer

VOCAB = 512


def vlp_model(cfg):
    model_cfg = {**cfg.model, "text": {**cfg.model["text"], "vocab_size": VOCAB}}
    return vlp.create_model("clip", model_cfg)


def open_clip_model(cfg):
    v, t = cfg.model["vision"], cfg.model["text"]
    vision = CLIPVisionCfg(
        layers=v["layers"],
        width=v["width"],
        head_width=v["width"] // v["heads"],
        patch_size=v["patch_size"],
        image_size=v["image_size"],
    )
    text = CLIPTextCfg(
        context_length=t["context_length"], vocab_size=VOCAB, width=t["width"], heads=t["heads"], layers=t["layers"]
    )
    return open_clip.model.CLIP(cfg.model["embed_dim"], vision, text)


def transformers_twin(model):
    """transformers' CLIPModel holding the same weights (written and read through vlp.save)."""
    import tempfile

    from transformers import CLIPModel

    with tempfile.TemporaryDirectory() as tmp:
        vlp.save(model, tmp, format="hf")
        return CLIPModel.from_pretrained(tmp).eval()


def vocab_batch(cfg, size, vocab=VOCAB, length=None):
    """Random images and full-length token ids (open_clip adds its positional table to the
    whole context, so for it the text must fill the context)."""
    gen = torch.Generator().manual_seed(0)
    image_size = cfg.model["vision"]["image_size"]
    length = length or cfg.model["text"]["context_length"]
    return {
        "images": torch.randn(size, 3, image_size, image_size, generator=gen),
        "input_ids": torch.randint(9, vocab, (size, length), generator=gen),
        "attention_mask": torch.ones(size, length, dtype=torch.long),
    }


def vlp_step(model, optimizer, b):
    loss = model(b)["itc"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def open_clip_step(model, optimizer, b, loss_fn=ClipLoss()):
    out = model(b["images"], b["input_ids"])
    loss = loss_fn(out[0], out[1], out[2])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(fn, reps, warmup, precision):
    """Seconds per call of each repetition, after warm-up."""
    times = []
    for i in range(warmup + reps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
    return times


def compare(name, fns, reps, warmup, precision, items, baseline="open_clip"):
    """Alternate the two contenders rep by rep; report median items/s and the vlp/baseline ratio."""
    results = {lib: [] for lib in fns}
    for _ in range(reps):
        for lib, fn in fns.items():
            results[lib] += timed(fn, 1, warmup, precision)
        warmup = 0
    rates = {lib: items / statistics.median(times) for lib, times in results.items()}
    return {
        "benchmark": name,
        "precision": precision,
        **{f"{lib}_per_s": round(r, 1) for lib, r in rates.items()},
        f"ratio_vlp_over_{baseline}": round(rates["vlp"] / rates[baseline], 3),
    }


def report(rows: list[dict], out: Path | None, meta: dict | None = None) -> None:
    """Print the rows (and meta) as JSON lines; also write them to `out` if given."""
    for line in ([meta] if meta else []) + rows:
        print(json.dumps(line))
    if out:
        out.write_text(json.dumps({"meta": meta or {}, "rows": rows}, indent=2))


def bench_arguments(doc: str, batch: int, reps: int, warmup: int, size: str = "tiny") -> argparse.Namespace:
    """The options every benchmark script takes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--size", default=size, help="config size of the recipe (configs/RECIPE/SIZE.yaml)")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    return parser.parse_args()


def main() -> None:
    args = bench_arguments(__doc__, batch=128, reps=7, warmup=2)
    cfg = load_run_config("clip", recipe_config_path("clip", args.size))
    torch.manual_seed(0)
    models = {"vlp": vlp_model(cfg), "open_clip": open_clip_model(cfg)}
    optimizers = {
        "vlp": build_optimizer(models["vlp"], cfg.train),  # each library's own training optimizer
        "open_clip": torch.optim.AdamW(models["open_clip"].parameters(), lr=1e-4),
    }
    b = vocab_batch(cfg, args.batch)
    steps = {
        "vlp": lambda: vlp_step(models["vlp"], optimizers["vlp"], b),
        "open_clip": lambda: open_clip_step(models["open_clip"], optimizers["open_clip"], b),
    }
    rows = [compare("train step (samples/s)", steps, args.reps, args.warmup, args.precision, args.batch)]
    inputs = vocab_batch(cfg, 256)
    images, ids, mask = inputs["images"], inputs["input_ids"], inputs["attention_mask"]
    hf = transformers_twin(models["vlp"])
    with torch.no_grad():
        hf_features = hf.get_image_features(pixel_values=images)  # transformers 5: an output object
        hf_features = getattr(hf_features, "pooler_output", hf_features)
        torch.testing.assert_close(
            hf_features, models["vlp"].encode_image(images, normalize=False), atol=1e-4, rtol=0
        )  # the competitor runs the same weights
        for name, fns, items in (
            (
                "image encoder (images/s)",
                {
                    "vlp": lambda: models["vlp"].encode_image(images),
                    "open_clip": lambda: models["open_clip"].encode_image(images),
                },
                256,
            ),
            (
                "image encoder vs transformers CLIPModel (images/s)",
                {
                    "vlp": lambda: models["vlp"].encode_image(images),
                    "transformers": lambda: hf.get_image_features(pixel_values=images),
                },
                256,
            ),
            (
                "text encoder (texts/s)",
                {
                    "vlp": lambda: models["vlp"].encode_text(ids, mask),
                    "open_clip": lambda: models["open_clip"].encode_text(ids),
                },
                256,
            ),
            (
                "text encoder vs transformers CLIPModel (texts/s)",
                {
                    "vlp": lambda: models["vlp"].encode_text(ids, mask),
                    "transformers": lambda: hf.get_text_features(input_ids=ids, attention_mask=mask),
                },
                256,
            ),
        ):
            baseline = next(lib for lib in fns if lib != "vlp")
            rows.append(compare(name, fns, args.reps, args.warmup, args.precision, items, baseline=baseline))
    meta = {
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "batch": args.batch,
        "params_vlp": sum(p.numel() for p in models["vlp"].parameters()),
        "params_open_clip": sum(p.numel() for p in models["open_clip"].parameters()),
    }
    report(rows, args.out, meta)


if __name__ == "__main__":
    main()
