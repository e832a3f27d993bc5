"""Model FLOP utilisation of the CLIP training step, vlp and open_clip side by side.

The step's FLOPs are counted once with `torch.utils.flop_counter.FlopCounterMode` (matmuls,
convolutions and attention, forward and backward; elementwise ops are not counted, as usual for
MFU); achieved FLOP/s = FLOPs per step / median seconds per step. The peak is this machine's,
measured in the same run: the best of 20 square matmuls of side 1024 in the benchmark's precision
(the best, as a peak is: this machine's speed varies from second to second).

    .venv/bin/python bench/mfu.py [--batch 128] [--reps 5] [--size tiny,small] [--precision fp32|bf16]
"""

from __future__ import annotations

import torch
from clip_tiny import (
    bench_arguments,
    compare,
    open_clip_model,
    open_clip_step,
    report,
    vlp_model,
    vlp_step,
    vocab_batch,
)
from torch.utils.flop_counter import FlopCounterMode

from vlp.config import load_run_config, recipe_config_path
from vlp.train.optim import build_optimizer
from vlp.train.precision import matmul_seconds

MATMUL = 1024


def matmul_peak(precision: str, reps: int = 20) -> float:
    """Best FLOP/s of a square matmul of side `MATMUL` in `precision` ("fp32" or "bf16")."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return 2 * MATMUL**3 / matmul_seconds(dtype, MATMUL, reps)


def step_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def add_mfu(row: dict, steps: dict, batch: int, peak: float) -> dict:
    """`row` (from `compare`) with each contender's GFLOP per step and MFU against `peak`."""
    for lib, step in steps.items():
        flops = step_flops(step)
        row[f"{lib}_gflop_per_step"] = round(flops / 1e9, 2)
        row[f"{lib}_mfu"] = round(flops * row[f"{lib}_per_s"] / batch / peak, 3)
    return row


def clip_steps(size: str, batch: int) -> dict:
    """A training step of vlp's and of open_clip's CLIP at config `size`, each with the AdamW
    its library trains with (vlp: fused; open_clip: torch's default)."""
    cfg = load_run_config("clip", recipe_config_path("clip", size))
    torch.manual_seed(0)
    models = {"vlp": vlp_model(cfg), "open_clip": open_clip_model(cfg)}
    optimizers = {
        "vlp": build_optimizer(models["vlp"], cfg.train),
        "open_clip": torch.optim.AdamW(models["open_clip"].parameters(), lr=1e-4),
    }
    b = vocab_batch(cfg, batch)
    return {
        "vlp": lambda: vlp_step(models["vlp"], optimizers["vlp"], b),
        "open_clip": lambda: open_clip_step(models["open_clip"], optimizers["open_clip"], b),
    }


def main() -> None:
    args = bench_arguments(__doc__, batch=128, reps=5, warmup=1, size="tiny,small")
    peak = matmul_peak(args.precision)
    timed = []
    for size in args.size.split(","):
        steps = clip_steps(size, args.batch)
        timed.append(
            (
                compare(
                    f"CLIP {size} train step (samples/s)", steps, args.reps, args.warmup, args.precision, args.batch
                ),
                steps,
            )
        )
    peak = max(peak, matmul_peak(args.precision))  # measured before and after the steps: the best
    rows = [add_mfu(row, steps, args.batch, peak) for row, steps in timed]
    meta = {
        f"{args.precision}_peak_gflops": round(peak / 1e9, 1),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
    }
    report(rows, args.out, meta)


if __name__ == "__main__":
    main()
