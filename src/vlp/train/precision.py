"""Which device and precision a run trains in: `train.device` and `train.precision` resolved.

`auto` precision is bf16 autocast only where it pays: CUDA with bf16, or a CPU whose bf16
matmuls are native and measured faster than fp32. Native is not enough on a CPU: AVX512-BF16
without AMX ran square bf16 matmuls at half the fp32 speed on one machine and 2x faster on
another (docs/benchmarks.md), so the choice is measured, once per process.
"""

from __future__ import annotations

import functools
import time

import torch
from rich.console import Console

from vlp import distributed as dist

console = Console(stderr=True)

BF16_MIN_SPEEDUP = 1.2  # how much faster a bf16 matmul must be than fp32 for `auto` to pick bf16


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively here: CUDA with bf16, or a CPU with AVX512-BF16/AMX.
    Elsewhere oneDNN emulates them and a bf16 autocast step is about 10x slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def matmul_seconds(dtype: torch.dtype, side: int = 1024, reps: int = 5) -> float:
    """Best time of `reps` square matmuls of `side` in `dtype` on the CPU (the best, as this
    machine's speed varies from second to second), after one untimed warm-up."""
    a, b = torch.randn(side, side, dtype=dtype), torch.randn(side, side, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return min(times)


@functools.cache
def cpu_bf16_speedup() -> float:
    """fp32 over bf16 matmul time on this CPU: above 1 where bf16 is faster (about 0.1 s to measure)."""
    return matmul_seconds(torch.float32) / matmul_seconds(torch.bfloat16)


def bf16_pays(device: torch.device) -> bool:
    """Whether bf16 autocast speeds training up here. Under torch.distributed every rank takes rank
    0's answer, so all ranks train in the same precision."""
    if device.type == "cuda":
        return native_bf16(device)
    pays = native_bf16(device) and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP
    if dist.is_distributed():
        decision = torch.tensor([int(pays)])
        torch.distributed.broadcast(decision, src=0)
        pays = bool(decision.item())
    return pays


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` is bf16 autocast where it pays (see `bf16_pays`), fp32 elsewhere."""
    if name not in ("auto", "fp32", "bf16"):
        raise ValueError(f"train.precision must be auto, fp32 or bf16, got {name!r}")
    if name == "auto":
        return "bf16" if bf16_pays(device) else "fp32"
    if name == "bf16" and not native_bf16(device) and dist.is_main():
        console.print(
            f"[yellow]train.precision=bf16 on a {device.type} without native bf16 matmuls: "
            "expect steps several times slower than fp32 (train.precision=auto picks for you)"
        )
    return name


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """bf16 autocast on `device` when the resolved `precision` is bf16; a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
