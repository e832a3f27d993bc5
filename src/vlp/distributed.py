"""Process-group helpers, a base module every layer may use: the same entry point runs alone or
under `torchrun` (gloo/NCCL)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(timeout: float = 600.0) -> bool:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); NCCL on GPU, else gloo.
    A collective that waits more than `timeout` seconds for a rank fails instead of hanging."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def gather_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's local batch size (they differ when a rank skipped unreadable samples)."""
    if not is_distributed():
        return [n]
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([n], device=device))
    return [int(s) for s in sizes]


def all_gather_with_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0; gradients flow back to every rank's part.

    Ranks may hold different numbers of rows (`sizes`, from `gather_sizes`, when known):
    parts are padded to the largest and trimmed.
    """
    if not is_distributed():
        return x
    sizes = sizes or gather_sizes(x.shape[0], x.device)
    padded = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, max(sizes) - x.shape[0]))
    parts = dist_fn.all_gather(padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)], dim=0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def is_timeout(err: RuntimeError) -> bool:
    """Whether a collective failed because a rank did not answer in time (gloo raises a plain
    RuntimeError that says so, NCCL's watchdog a DistError)."""
    return isinstance(err, dist.DistError) or "timed out" in str(err).lower()


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on every rank."""
    if not is_distributed():
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (small picklable records made by vlp itself, never file contents)."""
    if not is_distributed():
        return [obj]
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, obj)
    return parts


def all_gather_padded(x: torch.Tensor, value: float = 0) -> torch.Tensor:
    """`all_gather_with_grad` for [B, L, ...] tensors whose length L differs between ranks
    (token ids, masks, text states): each part is padded with `value` to the longest L."""
    if not is_distributed():
        return x
    length = torch.tensor([x.shape[1]], device=x.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    pad = [0, 0] * (x.dim() - 2) + [0, int(length) - x.shape[1]]
    return all_gather_with_grad(torch.nn.functional.pad(x, pad, value=value))


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Average the parameters' gradients over all ranks in one flat all-reduce: DDP's job, for a
    step whose backward runs outside DDP's forward (the trainer's cached-embedding accumulation).
    Every rank must hold gradients for the same parameters."""
    if not is_distributed():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    for grad, part in zip(grads, flat.split([grad.numel() for grad in grads])):
        grad.copy_(part.view_as(grad))
