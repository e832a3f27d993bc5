"""Shared fixtures: a small shapes world on disk and a tiny CLIP config."""

import pytest
import yaml
from typer.testing import CliRunner

from vlp.cli import app

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
