"""Retrieval evaluation at scale: time and peak memory of the top-k search behind Recall@K for
galleries of 10k, 100k and 1M items (synthetic 256-d embeddings, 1,000 queries), vlp's tiled
search against scoring the whole query x gallery matrix at once, and vlp's search followed by
ITM re-ranking of each query's top 16 (text-to-image, the tiny BLIP with random weights, through
the evaluation's own scorer: gallery images are read, here drawn, only when a block of
shortlisted pairs needs them). Each case runs in its own process so its peak resident memory is
its own.

    .venv/bin/python bench/retrieval_scale.py [--out rows.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from generation_hf import hf_compatible_blip  # noqa: E402  (bench/ is the script's folder)
from PIL import Image

from vlp.eval.encode import itm_scorer
from vlp.eval.retrieval import blockwise_topk, rerank

QUERIES, DIM, K, K_TEST = 1000, 256, 10, 16
RERANKED = "vlp + ITM re-ranking"


class DrawnImages:
    """A gallery of `items` images, each drawn from its index when read (nothing held)."""

    def __init__(self, size: int):
        self.size = size

    def __getitem__(self, index: int):
        gen = torch.Generator().manual_seed(index)
        pixels = torch.randint(0, 256, (self.size, self.size, 3), generator=gen, dtype=torch.uint8)
        return SimpleNamespace(image=Image.fromarray(pixels.numpy()))


def reranking(items: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """top-k search, then the first K_TEST of each query re-ranked by a tiny BLIP's ITM score."""
    model, cfg = hf_compatible_blip()
    model.eval()
    texts = [f"word{i} word{i * 7 % 512} word{i * 13 % 512}" for i in range(QUERIES)]
    score = itm_scorer(model, DrawnImages(cfg.model["vision"]["image_size"]), range(items), texts)

    def search(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        top = blockwise_topk(queries, gallery, max(K, K_TEST))
        return rerank(top, K_TEST, lambda query, image: score(image, query))[:, :K]

    return search


def run_case(items: int, method: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    gallery = torch.empty(items, DIM)  # filled in chunks: no temporaries to inflate the baseline peak
    for start in range(0, items, 10_000):
        chunk = gallery[start : start + 10_000]
        chunk.copy_(F.normalize(torch.randn(chunk.shape, generator=gen), dim=-1))
    queries = F.normalize(torch.randn(QUERIES, DIM, generator=gen), dim=-1)
    if method == RERANKED:
        search = reranking(items)
    else:
        search = {
            "vlp": lambda q, g: blockwise_topk(q, g, K),
            "full matrix": lambda q, g: (q @ g.T).topk(K, dim=1).indices,
        }[method]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    top = search(queries, gallery)
    seconds = time.perf_counter() - start
    extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB on Linux
    return {
        "items": items,
        "method": method,
        "seconds": round(seconds, 3),
        "extra_peak_MiB": round(extra / 1024, 1),
        "embeddings_MiB": round(items * DIM * 4 / 2**20, 1),
        "checksum": int(top[:, 0].sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs=2, metavar=("ITEMS", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(int(args.case[0]), args.case[1])))
        return
    rows = []
    for items in (10_000, 100_000, 1_000_000):
        for method in ("vlp", "full matrix", RERANKED):
            if method == "full matrix" and items > 100_000:
                rows.append({"items": items, "method": method, "skipped": "a 1000 x 1M float matrix is 4 GB"})
                continue
            out = subprocess.run(
                [sys.executable, __file__, "--case", str(items), method], capture_output=True, text=True, check=True
            )
            rows.append(json.loads(out.stdout))
            print(json.dumps(rows[-1]))
    if args.out:
        args.out.write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
