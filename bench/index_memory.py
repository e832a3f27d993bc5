"""Peak memory of `vlp index build` as the collection grows: bounded, not proportional to a
list of every image (docs/benchmarks.md).

Writes N tiny PNG files (16 px, in folders of 1,000) once, then builds an index over them in a
fresh process per size with a tiny CLIP (16 px images, 16-d embeddings, random weights), so
that the images' decoding and the encoder cost little and what grows with N is the build's own
bookkeeping: the embeddings faiss must hold (N x 16 x 4 bytes, exact search) plus whatever the
build keeps per image. Reports peak RSS (ru_maxrss) and images/s per size.

    .venv/bin/python bench/index_memory.py --sizes 10000,100000,1000000 --folder /tmp/collection
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_collection(folder: Path, count: int) -> None:
    """`count` distinct 16 px PNG files, 1,000 per sub-folder; kept between runs."""
    gen = np.random.default_rng(0)
    for i in range(count):
        path = folder / f"{i // 1000:05d}" / f"{i % 1000:03d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(gen.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)


def build_once(folder: Path, count: int, out: Path) -> dict:
    """One build in this process over the first `count` images (their sub-folders)."""
    import torch

    import vlp
    from vlp.apps.index import build
    from vlp.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(["a photo"] * 4, vocab_size=64)
    tower = {"width": 32, "layers": 1, "heads": 2}
    config = {
        "embed_dim": 16,
        "vision": {"image_size": 16, "patch_size": 8, **tower},
        "text": {"vocab_size": tokenizer.vocab_size, "context_length": 8, **tower},
    }
    torch.manual_seed(0)
    model = vlp.create_model("clip", config, tokenizer=tokenizer).eval()
    folders = sorted(folder.iterdir())[: count // 1000]
    start = time.perf_counter()
    info = build(model, folders, out, "bench", batch_size=256, workers=0, exact_limit=10**7, precision="fp32")
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "images": info["count"],
        "seconds": round(seconds, 1),
        "images_per_s": round(info["count"] / seconds),
        "peak_rss_mb": round(peak_mb),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/vlp-collection"))
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(build_once(args.folder, args.one, args.folder.with_name(f"index-{args.one}"))))
        return
    sizes = [int(size) for size in args.sizes.split(",")]
    write_collection(args.folder, max(sizes))
    rows = []
    for size in sizes:
        child = [sys.executable, __file__, "--folder", str(args.folder), "--one", str(size)]
        subprocess.run(["rm", "-rf", str(args.folder.with_name(f"index-{size}"))], check=True)
        rows.append(json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout))
        print(json.dumps(rows[-1]), flush=True)
    result = {"machine": platform.processor() or platform.machine(), "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
