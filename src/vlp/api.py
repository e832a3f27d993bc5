"""The Python entry points: `vlp.create_model` and `vlp.load`."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from vlp.config import RunConfig, from_dict, load_yaml
from vlp.data.tokenizer import Tokenizer
from vlp.train.checkpoint import load_weights, run_of, weights_of
from vlp.train.trainer import build_model


def load(path: str | Path, device: str = "cpu") -> nn.Module:
    """Load a trained model from a run directory (its newest checkpoint) or a checkpoint directory.

    The returned model is in eval mode and carries its tokenizer as `model.tokenizer`.
    """
    run_dir, weights = run_of(path), weights_of(path)
    cfg = from_dict(RunConfig, load_yaml(run_dir / "config.yaml"))
    tokenizer = Tokenizer.load(run_dir / "tokenizer.json")
    model = build_model(cfg, tokenizer)
    load_weights(model, weights)
    model.tokenizer = tokenizer
    model.run_config = cfg
    return model.to(device).eval()
