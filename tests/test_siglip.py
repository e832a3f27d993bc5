"""SigLIP (Zhai et al. 2023): the sigmoid loss is the paper's formula and open_clip's; its chunked
form over 2 gloo ranks equals one process on the global batch, loss and gradients; captions are
embedded the same however the batch is padded; a tiny run's loss falls on the shapes world."""

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from vlp.config import load_run_config
from vlp.losses.sigmoid import sigmoid_loss
from vlp.models import create_model

TINY = {
    "embed_dim": 24,
    "vision": {
        "image_size": 16,
        "patch_size": 8,
        "width": 24,
        "layers": 1,
        "heads": 3,
        "class_token": False,
        "pool": "map",
        "ln_pre": False,
        "patch_bias": True,
        "act": "gelu_tanh",
    },
    "text": {
        "vocab_size": 50,
        "context_length": 8,
        "width": 20,
        "layers": 1,
        "heads": 2,
        "causal": False,
        "pool": "last",
    },
    "tokens": {"pad": 0},
}


def embeddings(n: int, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=-1)
    y = torch.nn.functional.normalize(x + 0.5 * torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=-1)
    return x, y


def test_loss_is_the_papers_formula():
    x, y = embeddings(5)
    t, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    expected = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if i == j else -1.0
            expected -= math.log(1 / (1 + math.exp(-z * (t * x[i] @ y[j] + b))))
    torch.testing.assert_close(sigmoid_loss(x, y, t, b), torch.tensor(expected / 5, dtype=torch.float64))


def test_loss_equals_open_clips():
    open_clip = pytest.importorskip("open_clip")
    x, y = embeddings(7, seed=3)
    t, b = torch.tensor(4.2, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    torch.testing.assert_close(sigmoid_loss(x, y, t, b), open_clip.loss.SigLipLoss()(x, y, t, b), rtol=1e-12, atol=0)


def test_init_is_the_papers():
    model = create_model("siglip", TINY)
    assert model.scale().item() == pytest.approx(10.0) and model.logit_bias.item() == -10.0
    assert model.visual.cls_token is None and model.visual.pos_embed.shape[1] == 4  # 2 x 2 patches, no class token


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("siglip", TINY).double()


def make_batch(n: int = 6) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([8, 5, 3, 8, 6, 4])[:n]
    return {
        "images": torch.randn(n, 3, 16, 16, generator=gen, dtype=torch.float64),
        "input_ids": torch.randint(1, 50, (n, 8), generator=gen),
        "attention_mask": (torch.arange(8)[None] < lengths[:, None]).long(),
    }


SPLITS = {"equal": (0, 3, 6), "unequal": (0, 4, 6)}  # rows of the global batch each rank holds


def worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    for name, bounds in SPLITS.items():
        model = DistributedDataParallel(make_model())
        batch = {k: v[bounds[rank] : bounds[rank + 1]] for k, v in make_batch().items()}
        loss = model(batch)["sigmoid"]
        loss.backward()
        dist.all_reduce(loss.detach(), op=dist.ReduceOp.AVG)
        grads = {n: p.grad for n, p in model.module.named_parameters()}
        torch.save({"loss": loss.detach(), "grads": grads}, os.path.join(out_dir, f"{name}{rank}.pt"))
    dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tmp_path):
    """Sec. 3.3's ring: each rank's images against the text chunks passed around; DDP's mean
    over ranks is the loss of the global batch and its gradients, for equal and unequal halves."""
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    model = make_model()
    loss = model(make_batch())["sigmoid"]
    loss.backward()
    for name in SPLITS:
        for rank in range(2):
            result = torch.load(tmp_path / f"{name}{rank}.pt")
            torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-10, atol=1e-12)
            for param_name, param in model.named_parameters():
                torch.testing.assert_close(
                    result["grads"][param_name], param.grad, rtol=1e-8, atol=1e-10, msg=lambda m: f"{param_name}: {m}"
                )


def test_text_embedding_does_not_depend_on_batch_padding():
    model = make_model().eval()
    ids = torch.tensor([[5, 6, 7]])
    short = model.encode_text(ids, torch.ones_like(ids))
    padded = torch.tensor([[5, 6, 7, 9, 9]])  # another pad id, masked out
    longer = model.encode_text(padded, torch.tensor([[1, 1, 1, 0, 0]]))
    torch.testing.assert_close(short, longer, rtol=0, atol=0)


def test_loss_falls_on_shapes(tmp_path, shapes_dir):
    from vlp.train.trainer import Trainer

    overrides = [
        f"data.path={shapes_dir}",
        "data.batch_size=16",
        "data.workers=0",
        "model.embed_dim=32",
        "model.vision.image_size=32",
        "model.vision.width=32",
        "model.vision.layers=2",
        "model.vision.heads=2",
        "model.text.width=32",
        "model.text.layers=2",
        "model.text.heads=2",
        "train.steps=80",
        "train.warmup=2",
        "train.log_every=10",
        "train.ckpt_every=80",
        "train.precision=fp32",
    ]
    Trainer(load_run_config("siglip", None, overrides), tmp_path / "run", progress=False).fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    # A model that ignores its inputs at best gives every pair p = 1/16: 16 x H(1/16) = 3.74 per image.
    chance = -(math.log(1 / 16) + 15 * math.log(15 / 16))
    assert sum(losses[-2:]) / 2 < 0.9 * chance, losses


def test_siglip_labels_get_independent_sigmoid_probabilities():
    """Zero-shot labels of a SigLIP are each pair's sigmoid(t x.y + b), as its loss trains them
    (transformers' pipeline does the same), not a softmax over the labels."""
    torch.manual_seed(0)
    model = create_model("siglip", TINY).eval()
    image_emb = torch.nn.functional.normalize(torch.randn(2, model.cfg.embed_dim), dim=-1)
    label_emb = torch.nn.functional.normalize(torch.randn(3, model.cfg.embed_dim), dim=-1)
    expected = torch.sigmoid(model.scale() * image_emb @ label_emb.T + model.logit_bias)
    torch.testing.assert_close(model.label_probabilities(image_emb, label_emb), expected)
    assert not torch.allclose(expected.sum(dim=-1), torch.ones(2))
