"""The Python entry points: `vlp.create_model`, `vlp.load` and `vlp.caption`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
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


def caption(model: nn.Module, images: torch.Tensor, method: str = "beam", prompt: str | None = None,
            **options: Any) -> list[str]:
    """Captions of a batch of (eval-transformed) images, as text without the prompt.

    `prompt` defaults to the one the model was trained with (`data.prompt`, e.g. "a picture of ");
    decoding options as `vlp.generate.generate` (num_beams, max_new_tokens, top_p, ...).
    """
    if not hasattr(model, "generate"):
        raise TypeError(f"recipe {getattr(model, 'recipe', type(model).__name__)!r} has no text decoder")
    if prompt is None:
        prompt = model.run_config.data.prompt if hasattr(model, "run_config") else ""
    prompt_ids = None
    if prompt.strip():
        prompt_ids = model.tokenizer(prompt, style=model.tokenizer_style)["input_ids"][:, 1:-1]
        prompt_ids = prompt_ids.to(images.device)
    ids = model.generate(images, prompt_ids, method=method, **options)
    start = 1 + (0 if prompt_ids is None else prompt_ids.shape[1])
    return [text.strip() for text in model.tokenizer.batch_decode(ids[:, start:])]
