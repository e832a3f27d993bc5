"""Peak memory per rank and step time of BLIP training under DDP and FSDP, with and without
activation checkpointing, on 2 CPU ranks (gloo); and the largest batch each fits in a memory budget.

Each measurement is its own `torchrun --nproc_per_node 2` launch (a process's peak RSS only
grows), running `--reps` timed training steps (forward, backward, AdamW, EMA of the momentum
encoders) after one untimed step, on random images and token ids. Local loss (each rank scores
its rows against the gathered batch) is vlp's only contrastive form, so every row has it.

Memory is each rank's peak resident set (`ru_maxrss`), the larger of the two ranks, and the
same minus the RSS before the model was built ("above start": model, gradients, optimizer
state, activations). The largest batch in `--budget` GiB is fitted, not searched: peak RSS is
measured at two batch sizes, a line through them is solved for the budget (activations grow
linearly with the batch).

    .venv/bin/python bench/scale.py [--sizes small,base] [--batches 4,8] [--reps 3] [--budget 6]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODES = {
    "ddp": {"parallel": "ddp", "ckpt": False},
    "ddp + checkpointing": {"parallel": "ddp", "ckpt": True},
    "fsdp": {"parallel": "fsdp", "ckpt": False},
    "fsdp + checkpointing": {"parallel": "fsdp", "ckpt": True},
}
VOCAB = 30522  # BERT's, as BLIP's text encoder


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(size: str, mode: str, batch: int, reps: int, out: Path) -> None:
    """One rank of one measurement (under torchrun)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import vlp
    from vlp.config import load_run_config
    from vlp.data.tokenizer import SPECIAL_TOKENS
    from vlp.nn.transformer import set_grad_checkpointing
    from vlp.train import fsdp
    from vlp.train.optim import build_optimizer

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    start = rss_mib()
    cfg = load_run_config("blip", None if size == "tiny" else Path(f"src/vlp/configs/blip/{size}.yaml"))
    tokens = {
        name: SPECIAL_TOKENS.index(t)
        for name, t in zip(("pad", "unk", "cls", "sep", "mask", "enc", "dec"), SPECIAL_TOKENS)
    }
    torch.manual_seed(0)
    model = vlp.create_model(
        "blip", {**cfg.model, "text": {**cfg.model["text"], "vocab_size": VOCAB}, "tokens": tokens}
    ).train()
    set_grad_checkpointing(model, MODES[mode]["ckpt"])
    if MODES[mode]["parallel"] == "fsdp":
        replicated = fsdp.shard(model, torch.device("cpu"), "fp32")
        net = model
    else:
        replicated, net = [], DistributedDataParallel(model)
    optimizer = build_optimizer(model, cfg.train)
    gen = torch.Generator().manual_seed(dist.get_rank())
    side, length = cfg.model["vision"]["image_size"], 16
    ids = torch.randint(9, VOCAB, (batch, length), generator=gen)
    ids[:, 0], ids[:, -1] = tokens["cls"], tokens["sep"]
    data = {
        "images": torch.randn(batch, 3, side, side, generator=gen),
        "input_ids": ids,
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
    }
    times = []
    for rep in range(reps + 1):
        dist.barrier()
        began = time.perf_counter()
        sum(net(data).values()).backward()
        fsdp.average_replicated(replicated) if replicated else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.after_optimizer_step()
        dist.barrier()
        if rep:
            times.append(time.perf_counter() - began)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {"peak": peak, "above": peak - start})
    if dist.get_rank() == 0:
        params = sum(p.numel() for p in model.parameters())
        out.write_text(
            json.dumps(
                {
                    "size": size,
                    "mode": mode,
                    "batch": batch,
                    "params": params,
                    "step_s": statistics.median(times),
                    "peak_mib": max(p["peak"] for p in parts),
                    "above_mib": max(p["above"] for p in parts),
                }
            )
        )
    dist.destroy_process_group()


def measure(size: str, mode: str, batch: int, reps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        args = [__file__, "--worker", size, mode, str(batch), str(reps), str(out)]
        result = subprocess.run(
            [*command, *args], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        if not out.is_file():
            raise RuntimeError(f"{size} {mode} batch {batch} failed:\n{result.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="small,base")
    parser.add_argument("--batches", default="4,8", help="per-rank batch sizes; the first is the table's")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--budget", type=float, default=6.0, help="GiB of peak RSS per rank")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--worker", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        size, mode, batch, reps, out = args.worker
        return worker(size, mode, int(batch), int(reps), Path(out))
    small, large = (int(b) for b in args.batches.split(","))
    rows = []
    head = f"| config | mode | params | step, batch {small}/rank | peak RSS/rank | above start |"
    print(f"{head} batch in {args.budget:g} GiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for size in args.sizes.split(","):
        for mode in args.modes.split(","):
            a, b = measure(size, mode, small, args.reps), measure(size, mode, large, args.reps)
            per_sample = (b["peak_mib"] - a["peak_mib"]) / (large - small)
            fits = int((args.budget * 1024 - a["peak_mib"]) / per_sample) + small if per_sample > 0 else None
            row = {**a, "step_s_large": b["step_s"], "peak_mib_large": b["peak_mib"], "mib_per_sample": per_sample}
            row["batch_in_budget"] = fits
            rows.append(row)
            print(
                f"| {size} | {mode} | {a['params'] / 1e6:.0f} M | {a['step_s']:.2f} s | {a['peak_mib']:.0f} MiB "
                f"| {a['above_mib']:.0f} MiB | {fits} |",
                flush=True,
            )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
