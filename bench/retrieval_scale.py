"""Retrieval evaluation at scale: time and peak memory of the top-k search behind Recall@K for
galleries of 10k, 100k and 1M items (synthetic 256-d embeddings, 1,000 queries), vlp's tiled
search against scoring the whole query x gallery matrix at once. Each case runs in its own
process so its peak resident memory is its own.

    .venv/bin/python bench/retrieval_scale.py [--out rows.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vlp.eval.retrieval import blockwise_topk

QUERIES, DIM, K = 1000, 256, 10


def run_case(items: int, method: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    gallery = torch.empty(items, DIM)  # filled in chunks: no temporaries to inflate the baseline peak
    for start in range(0, items, 10_000):
        chunk = gallery[start:start + 10_000]
        chunk.copy_(F.normalize(torch.randn(chunk.shape, generator=gen), dim=-1))
    queries = F.normalize(torch.randn(QUERIES, DIM, generator=gen), dim=-1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if method == "vlp":
        top = blockwise_topk(queries, gallery, K)
    else:
        top = (queries @ gallery.T).topk(K, dim=1).indices
    seconds = time.perf_counter() - start
    extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB on Linux
    return {"items": items, "method": method, "seconds": round(seconds, 3),
            "extra_peak_MiB": round(extra / 1024, 1), "embeddings_MiB": round(items * DIM * 4 / 2 ** 20, 1),
            "checksum": int(top[:, 0].sum())}


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
        for method in ("vlp", "full matrix"):
            if method == "full matrix" and items > 100_000:
                rows.append({"items": items, "method": method, "skipped": "a 1000 x 1M float matrix is 4 GB"})
                continue
            out = subprocess.run([sys.executable, __file__, "--case", str(items), method], capture_output=True,
                                 text=True, check=True)
            rows.append(json.loads(out.stdout))
            print(json.dumps(rows[-1]))
    if args.out:
        args.out.write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
