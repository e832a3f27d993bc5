"""Two gloo processes on halves of a global batch == one process on the whole batch."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from vlp.models import create_model

TINY = {
    "embed_dim": 16,
    "vision": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
    "text": {"vocab_size": 50, "context_length": 8, "width": 32, "layers": 1, "heads": 2},
}


def make_model():
    torch.manual_seed(0)
    return create_model("clip", TINY).double()


def make_batch():
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([8, 5, 3, 8, 6, 4])
    return {
        "images": torch.randn(6, 3, 16, 16, generator=gen, dtype=torch.float64),
        "input_ids": torch.randint(0, 50, (6, 8), generator=gen),
        "attention_mask": (torch.arange(8)[None] < lengths[:, None]).long(),
    }


def worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = DistributedDataParallel(make_model())
    batch = {k: v[rank * 3 : (rank + 1) * 3] for k, v in make_batch().items()}
    loss = model(batch)["itc"]
    loss.backward()
    dist.all_reduce(loss.detach(), op=dist.ReduceOp.AVG)
    grads = {n: p.grad for n, p in model.module.named_parameters()}
    torch.save({"loss": loss.detach(), "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_process_gloo_matches_single_process(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    model = make_model()
    loss = model(make_batch())["itc"]
    loss.backward()
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-10, atol=1e-12)
        for name, param in model.named_parameters():
            torch.testing.assert_close(
                result["grads"][name], param.grad, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}"
            )
