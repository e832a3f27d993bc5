"""The Python entry points: `vlp.create_model` and `vlp.load`."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from vlp.config import RunConfig, from_dict, load_yaml
from vlp.data.tokenizer import Tokenizer
from vlp.train.checkpoint import latest_checkpoint, load_weights
from vlp.train.trainer import build_model


def load(path: str | Path, device: str = "cpu") -> nn.Module:
    """Load a trained model from a run directory (its newest checkpoint) or a checkpoint directory.

    The returned model is in eval mode and carries its tokenizer as `model.tokenizer`.
    """
    path = Path(path)
    run_dir = path.parent.parent if (path / "model.safetensors").is_file() else path
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{path} is not a vlp run or checkpoint directory (no config.yaml)")
    weights_dir = path if (path / "model.safetensors").is_file() else latest_checkpoint(run_dir)
    if weights_dir is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet")
    cfg = from_dict(RunConfig, load_yaml(run_dir / "config.yaml"))
    tokenizer = Tokenizer.load(run_dir / "tokenizer.json")
    model = build_model(cfg, tokenizer)
    load_weights(model, weights_dir / "model.safetensors")
    model.tokenizer = tokenizer
    model.run_config = cfg
    return model.to(device).eval()
