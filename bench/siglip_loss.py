"""SigLIP's cost: a tiny SigLIP training step vs a tiny CLIP step at equal batch, and vlp's
sigmoid loss vs open_clip's `SigLipLoss` (and vlp's softmax ITC) on the same embeddings.

Time: medians over repetitions that alternate between the contenders (machine noise hits
both). Memory: the bytes autograd saves for the backward pass (activations, counted once per
storage through `saved_tensors_hooks`), which is what grows with the batch; CPU PyTorch has no
peak-allocation counter.

    .venv/bin/python bench/siglip_loss.py [--batch 128] [--reps 5] [--loss-batches 256 1024 4096]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

import vlp
from vlp.config import load_run_config
from vlp.losses.itc import itc_loss
from vlp.losses.sigmoid import sigmoid_loss

VOCAB = 512


class SavedBytes:
    """Bytes of the distinct storages autograd saves while the context is open."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self) -> SavedBytes:
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)

    @property
    def mib(self) -> float:
        return sum(self.storages.values()) / 2**20


def model_and_batch(recipe: str, batch: int):
    cfg = load_run_config(recipe)
    model_cfg = {**cfg.model, "text": {**cfg.model["text"], "vocab_size": VOCAB}}
    torch.manual_seed(0)
    model = vlp.create_model(recipe, model_cfg).train()
    size, length = cfg.model["vision"]["image_size"], cfg.model["text"]["context_length"]
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(6, 14, (batch,), generator=gen)
    data = {
        "images": torch.randn(batch, 3, size, size, generator=gen),
        "input_ids": torch.randint(10, VOCAB, (batch, 16), generator=gen),
        "attention_mask": (torch.arange(16)[None] < lengths[:, None]).long(),
    }
    assert length >= 16
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4), data


def step_seconds(model, optimizer, data) -> tuple[float, float]:
    """One training step: (seconds, MiB autograd saved)."""
    start = time.perf_counter()
    with SavedBytes() as saved:
        loss = sum(model(data).values())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, saved.mib


def bench_steps(batch: int, reps: int) -> dict:
    contenders = {name: model_and_batch(name, batch) for name in ("clip", "siglip")}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    memory = {}
    for args in contenders.values():  # warm-up
        step_seconds(*args)
    for _ in range(reps):
        for name, args in contenders.items():
            seconds, memory[name] = step_seconds(*args)
            times[name].append(seconds)
    return {name: {"step_ms": 1e3 * statistics.median(times[name]), "saved_mib": memory[name]} for name in contenders}


def loss_fns():
    siglip = SigLipLoss()
    return {
        "vlp sigmoid_loss": lambda x, y, t, b: sigmoid_loss(x, y, t, b),
        "open_clip SigLipLoss": lambda x, y, t, b: siglip(x, y, t, b),
        "vlp itc_loss (softmax)": lambda x, y, t, b: itc_loss(x, y, t),
    }


def loss_seconds(fn, batch: int, dim: int) -> tuple[float, float, float]:
    gen = torch.Generator().manual_seed(batch)
    x = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1).requires_grad_()
    t, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    start = time.perf_counter()
    with SavedBytes() as saved:
        loss = fn(x, y, t, b)
    loss.backward()
    return time.perf_counter() - start, saved.mib, loss.item()


def bench_losses(batches: list[int], dim: int, reps: int) -> dict:
    out = {}
    fns = loss_fns()
    for batch in batches:
        times = {name: [] for name in fns}
        memory, values = {}, {}
        for fn in fns.values():
            loss_seconds(fn, batch, dim)  # warm-up
        for _ in range(reps):
            for name, fn in fns.items():
                seconds, memory[name], values[name] = loss_seconds(fn, batch, dim)
                times[name].append(seconds)
        out[batch] = {
            name: {"ms": 1e3 * statistics.median(times[name]), "saved_mib": memory[name], "loss": values[name]}
            for name in fns
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--loss-batches", type=int, nargs="+", default=[256, 1024, 4096])
    args = parser.parse_args()
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor()}))
    for name, row in bench_steps(args.batch, args.reps).items():
        print(f"step {name:7s} batch {args.batch}: {row['step_ms']:8.1f} ms  saved {row['saved_mib']:7.1f} MiB")
    for batch, rows in bench_losses(args.loss_batches, args.dim, args.reps).items():
        for name, row in rows.items():
            print(
                f"loss batch {batch:5d} {name:24s}: {row['ms']:8.2f} ms  saved {row['saved_mib']:8.1f} MiB"
                f"  (loss {row['loss']:.6f})"
            )


if __name__ == "__main__":
    main()
