"""Model FLOP utilisation of the CLIP training step, vlp and open_clip side by side.

The step's FLOPs are counted once with `torch.utils.flop_counter.FlopCounterMode` (matmuls,
convolutions and attention, forward and backward; elementwise ops are not counted, as usual for
MFU); achieved FLOP/s = FLOPs per step / median seconds per step. The peak is this machine's,
measured in the same run: the median of 1024 x 1024 x 1024 matmuls in fp32 and in bf16.

    .venv/bin/python bench/mfu.py [--batch 128] [--reps 5] [--size tiny,small] [--precision fp32|bf16]
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from clip_tiny import bench_arguments, compare, open_clip_model, open_clip_step, report, vlp_model, vlp_step, vocab_batch
from vlp.config import load_run_config, recipe_config_path
from vlp.train.optim import build_optimizer

MATMUL = 1024


def matmul_peak(dtype: torch.dtype, reps: int = 5) -> float:
    """Median FLOP/s of a square fp32 or bf16 matmul of side `MATMUL`."""
    a, b = torch.randn(MATMUL, MATMUL, dtype=dtype), torch.randn(MATMUL, MATMUL, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * MATMUL ** 3 / statistics.median(times)


def step_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def main() -> None:
    args = bench_arguments(__doc__, batch=128, reps=5, warmup=1, size="tiny,small")
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    rows = []
    for size in args.size.split(","):
        cfg = load_run_config("clip", recipe_config_path("clip", size))
        torch.manual_seed(0)
        models = {"vlp": vlp_model(cfg), "open_clip": open_clip_model(cfg)}
        optimizers = {"vlp": build_optimizer(models["vlp"], cfg.train),  # what each library trains with
                      "open_clip": torch.optim.AdamW(models["open_clip"].parameters(), lr=1e-4)}
        b = vocab_batch(cfg, args.batch)
        steps = {"vlp": lambda: vlp_step(models["vlp"], optimizers["vlp"], b),
                 "open_clip": lambda: open_clip_step(models["open_clip"], optimizers["open_clip"], b)}
        flops = {lib: step_flops(step) for lib, step in steps.items()}
        row = compare(f"CLIP {size} train step (samples/s)", steps, args.reps, args.warmup, args.precision,
                      args.batch)
        for lib in steps:
            achieved = flops[lib] * row[f"{lib}_per_s"] / args.batch
            row[f"{lib}_gflop_per_step"] = round(flops[lib] / 1e9, 2)
            row[f"{lib}_mfu"] = round(achieved / peaks[args.precision], 3)
        rows.append(row)
    meta = {"peak_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()}, "threads": torch.get_num_threads(),
            "batch": args.batch}
    report(rows, args.out, meta)


if __name__ == "__main__":
    main()
