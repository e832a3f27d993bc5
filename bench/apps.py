"""The applications side by side with what people use today, in one process, same weights.

- classify: `vlp.apps.classify` vs transformers' `pipeline("zero-shot-image-classification")`
  holding the same CLIP (`--config`: configs/clip/tiny.yaml, 64 px, or small.yaml, 224 px;
  written by `vlp.save(..., format="hf")`), over the same PIL images, labels and single prompt
  template; images/s and how often the two agree on the top label;
  vlp in fp32 and at its default precision (auto), the pipeline at its default (fp32).
- index build: `vlp.apps.index.build` over a folder of PNG files, with the default number of
  decoding workers and with 2, vs the bare image encoder on pre-decoded tensors, all fp32: how
  much of the encoder's speed survives.
- search: p50/p95 latency of one query against N synthetic 512-d embeddings, faiss exact
  (IndexFlatIP) vs faiss HNSW (with its recall@10 against exact) vs vlp's blockwise search.

    .venv/bin/python bench/apps.py [--config tiny] [--images 512] [--sizes 100000,1000000]
                                   [--parts classify,build,search]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from clip_tiny import report  # noqa: E402  (bench/ is the script's folder)
from PIL import Image

import vlp
from vlp.apps.classify import classifier
from vlp.apps.index import build, decode_workers, faiss_index
from vlp.apps.inputs import count_images, image_sources
from vlp.config import load_run_config, recipe_config_path
from vlp.data.tokenizer import EOT, SOT, Tokenizer
from vlp.data.transforms import model_images
from vlp.eval.retrieval import blockwise_topk

LABELS = ["circle", "square", "triangle", "diamond", "red thing", "green thing", "blue thing", "cat", "dog", "car"]
TEMPLATE = "This is a photo of {}."  # the pipeline's default hypothesis template


def clip_model(size: str = "tiny") -> torch.nn.Module:
    """configs/clip/{size}.yaml with random weights and a tokenizer trained on the labels."""
    cfg = load_run_config("clip", recipe_config_path("clip", size))
    tokenizer = Tokenizer.train([TEMPLATE.format(label) for label in LABELS] * 4, vocab_size=256)
    model_cfg = {**cfg.model, "text": {**cfg.model["text"], "vocab_size": tokenizer.vocab_size}}
    torch.manual_seed(0)
    return vlp.create_model("clip", model_cfg, tokenizer=tokenizer).eval()


def photos(count: int, size: int = 64) -> list[Image.Image]:
    gen = np.random.default_rng(0)
    return [Image.fromarray(gen.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def transformers_pipeline(model, folder: Path):
    """transformers' zero-shot pipeline over `model`'s weights, processor matching vlp's transforms."""
    from transformers import CLIPImageProcessor, PreTrainedTokenizerFast, pipeline

    vlp.save(model, folder, format="hf")
    size = model.image_size()
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    # vlp frames CLIP texts as <|startoftext|> text <|endoftext|> itself; give transformers' tokenizer
    # the same framing as a post-processor, so both sides encode the same ids.
    framed = model.tokenizer._framed(f"{SOT} $A {EOT}", [SOT, EOT])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=framed, pad_token="[PAD]")
    return pipeline(
        "zero-shot-image-classification",
        model=str(folder),
        tokenizer=tokenizer,
        image_processor=processor,
        device="cpu",
    )


def median_rates(fns: dict, items: int, reps: int) -> dict[str, float]:
    """Items per second of each function, the median of `reps` runs, the functions taking turns
    (a, b, a, b, ...) so that whatever else the machine does falls on both alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: items / statistics.median(values) for name, values in times.items()}


def bench_classify(model, images: list[Image.Image], reps: int, batch: int, precision: str) -> dict:
    """vlp at `precision` vs the pipeline at its default (fp32)."""
    vlp_classify = classifier(model, LABELS, [TEMPLATE], top_k=1, precision=precision)
    with tempfile.TemporaryDirectory() as tmp:
        hf = transformers_pipeline(model, Path(tmp))

        def run_vlp():
            return [r for start in range(0, len(images), batch) for r in vlp_classify(images[start : start + batch])]

        def run_hf():
            return hf(images, candidate_labels=LABELS, hypothesis_template=TEMPLATE, batch_size=batch)

        agree = np.mean([a[0][0] == b[0]["label"] for a, b in zip(run_vlp(), run_hf())])
        rates = median_rates({"vlp": run_vlp, "transformers": run_hf}, len(images), reps)
    return {
        "benchmark": f"classify (images/s), vlp --precision {precision}",
        "vlp_per_s": round(rates["vlp"], 1),
        "transformers_pipeline_per_s": round(rates["transformers"], 1),
        "ratio_vlp_over_transformers": round(rates["vlp"] / rates["transformers"], 2),
        "top1_agreement": round(float(agree), 3),
    }


def bench_index_build(model, images: list[Image.Image], reps: int, batch: int, workers: int | None) -> dict:
    """`vlp index build` over PNG files vs the bare encoder on decoded tensors, both fp32."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for i, image in enumerate(images):
            image.save(folder / f"{i:06d}.png")
        assert count_images(image_sources([folder])) == len(images)
        counter = iter(range(10**6))

        def run_build():
            index = Path(tmp) / f"index{next(counter)}"
            build(model, [folder], index, "bench", batch_size=batch, workers=workers, precision="fp32")

        tensors = model_images(model, images).split(batch)

        def run_encoder():
            with torch.no_grad():
                for chunk in tensors:
                    model.encode_image(chunk)

        rates = median_rates({"build": run_build, "encoder": run_encoder}, len(images), reps)
    chosen = decode_workers(torch.device("cpu")) if workers is None else workers
    return {
        "benchmark": f"index build (images/s, {chosen} decoding workers{' (default)' if workers is None else ''})",
        "vlp_build_per_s": round(rates["build"], 1),
        "bare_encoder_per_s": round(rates["encoder"], 1),
        "build_share_of_encoder": round(rates["build"] / rates["encoder"], 3),
    }


def bench_search(size: int, dim: int = 512, queries: int = 200) -> dict:
    gen = torch.Generator().manual_seed(0)
    # Embeddings cluster (images of one kind lie close): 1,000 centres, each item near one.
    centres = torch.randn(1000, dim, generator=gen)
    gallery = F.normalize(
        centres[torch.randint(0, 1000, (size,), generator=gen)] + 0.5 * torch.randn(size, dim, generator=gen), dim=1
    )
    probes = F.normalize(
        gallery[torch.randint(0, size, (queries,), generator=gen)] + 0.1 * torch.randn(queries, dim, generator=gen),
        dim=1,
    )
    exact, _ = faiss_index(gallery.numpy(), exact_limit=size)
    hnsw, info = faiss_index(gallery.numpy(), exact_limit=0)
    latencies = {"faiss_exact": [], "faiss_hnsw": [], "vlp_blockwise": []}
    for q in probes.numpy():
        for name, fn in (
            ("faiss_exact", lambda: exact.search(q[None], 10)),
            ("faiss_hnsw", lambda: hnsw.search(q[None], 10)),
            ("vlp_blockwise", lambda: blockwise_topk(torch.from_numpy(q[None]), gallery, 10)),
        ):
            start = time.perf_counter()
            fn()
            latencies[name].append(1000 * (time.perf_counter() - start))
    row = {
        "benchmark": f"search latency, {size} x {dim} (ms)",
        "hnsw_recall_at_10": round(info["recall_at_10"], 3),
        "hnsw_ef_search": info["ef_search"],
    }
    for name, values in latencies.items():
        row[f"{name}_p50"] = round(float(np.percentile(values, 50)), 2)
        row[f"{name}_p95"] = round(float(np.percentile(values, 95)), 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sizes", default="100000", help="comma-separated gallery sizes for the search rows")
    parser.add_argument("--parts", default="classify,build,search", help="which benchmarks to run")
    parser.add_argument("--config", default="tiny", help="configs/clip/<config>.yaml: tiny (64 px) or small (224 px)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    parts = args.parts.split(",")
    model = clip_model(args.config)
    images = photos(args.images, size=model.image_size())
    rows = []
    if "classify" in parts:
        rows += [bench_classify(model, images, args.reps, args.batch, precision) for precision in ("fp32", "auto")]
    if "build" in parts:
        rows += [bench_index_build(model, images, args.reps, args.batch, workers) for workers in (None, 2)]
    if "search" in parts:
        rows += [bench_search(int(size)) for size in args.sizes.split(",")]
    meta = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "images": args.images,
        "batch": args.batch,
    }
    report(rows, args.out, meta)


if __name__ == "__main__":
    main()
