"""Shared fixtures and helpers: a small shapes world on disk, a tiny CLIP config and model,
and `vlp train` under torchrun."""

import os
import subprocess
import sys

import pytest
import torch
import yaml
from typer.testing import CliRunner

import vlp
from vlp.cli import app
from vlp.data.tokenizer import Tokenizer

COUNTS = {"train": 96, "val": 8, "test": 24, "clean": 8, "classify": 24, "compositional": 8}

TINY_CONFIG = {
    "recipe": "clip",
    "model": {
        "embed_dim": 32,
        "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2},
        "text": {"context_length": 32, "width": 32, "layers": 2, "heads": 2},
    },
    "data": {"batch_size": 16, "workers": 0},
    "train": {"steps": 6, "lr": 1e-3, "warmup": 2, "log_every": 1, "ckpt_every": 3},
}


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small shapes world written through the CLI (webdataset shards + tokenizer.json)."""
    out = tmp_path_factory.mktemp("shapes")
    args = ["data", "shapes", "--out", str(out), "--image-size", "32", "--vocab-size", "512"]
    for split, count in COUNTS.items():
        args += [f"--{split}", str(count)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def tiny_config(tmp_path, shapes_dir):
    """Path of a tiny CLIP config pointing at the session's shapes world."""
    config = {**TINY_CONFIG, "data": {**TINY_CONFIG["data"], "path": str(shapes_dir)}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def torchrun_train(*args: str) -> subprocess.CompletedProcess:
    """`vlp train ARGS` in 2 gloo processes under torchrun, one thread each."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*command, "-m", "vlp.cli", "train", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )


def tiny_clip(shapes_dir) -> torch.nn.Module:
    """A randomly initialised tiny CLIP with the shapes world's tokenizer, in eval mode."""
    tokenizer = Tokenizer.load(shapes_dir)
    torch.manual_seed(0)
    tower = {"width": 32, "layers": 1, "heads": 2}
    config = {
        "embed_dim": 16,
        "vision": {"image_size": 32, "patch_size": 8, **tower},
        "text": {"vocab_size": tokenizer.vocab_size, "context_length": 32, **tower},
    }
    return vlp.create_model("clip", config, tokenizer=tokenizer).eval()
