"""The Python entry points: `vlp.create_model`, `vlp.load`, `vlp.save` and `vlp.caption`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from vlp.config import RunConfig, from_dict, load_yaml, to_dict
from vlp.data.tokenizer import Tokenizer
from vlp.interop.pretrained import is_pretrained_dir, load_pretrained, save_hf
from vlp.models.registry import build_model
from vlp.train.checkpoint import load_weights, run_of, save_checkpoint, weights_of
from vlp.train.rundir import RunError, holds_run


def load(path: str | Path, device: str = "cpu", strict: bool = True) -> nn.Module:
    """Load a model from a vlp run directory (its newest checkpoint) or checkpoint directory, a
    transformers or open_clip checkpoint directory, or a Hugging Face hub id (docs/interop.md).

    The returned model is in eval mode and carries its tokenizer as `model.tokenizer`. `strict`
    (checkpoints of other libraries): unmatched weights are an error rather than a warning.
    """
    if is_pretrained_dir(Path(path)) or not Path(path).exists():
        return load_pretrained(path, strict=strict).to(device)
    run_dir, weights = run_of(path), weights_of(path)
    cfg = from_dict(RunConfig, load_yaml(run_dir / "config.yaml"))
    tokenizer = Tokenizer.load(run_dir / "tokenizer.json")
    model = build_model(cfg, tokenizer)
    load_weights(model, weights)
    model.tokenizer = tokenizer
    model.run_config = cfg
    return model.to(device).eval()


def save(model: nn.Module, out: str | Path, format: str = "vlp", task: str | None = None) -> Path:
    """Write `model` (with its `.tokenizer`) to directory `out`: `format="vlp"` as a run that
    `vlp.load`, `vlp eval` and `vlp train --init` take; `format="hf"` as a transformers checkpoint
    (`task`: which transformers model a BLIP with all three objectives becomes, "retrieval" or
    "captioning")."""
    if format == "hf":
        return model.save_hf(Path(out)) if hasattr(model, "save_hf") else save_hf(model, out, task)
    if format != "vlp":
        raise ValueError(f"format must be 'vlp' or 'hf', got {format!r}")
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("the model has no tokenizer (model.tokenizer), which a vlp run needs: load "
                         "the checkpoint from a directory with tokenizer files")
    out = Path(out)
    if holds_run(out):  # its checkpoints would outrank (and prune) the one written here
        raise RunError(f"{out} already holds a vlp run; save into a fresh directory")
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_lm"):  # a frozen LM kept outside the state dict (BLIP-2 stage 2)
        model.cfg.lm = str(model.save_lm(out / "lm"))
    config = RunConfig(recipe=model.recipe, model=to_dict(model.cfg))
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    model.tokenizer.save(out / "tokenizer.json")
    save_checkpoint(out, 0, model, {"step": 0})
    return out


def caption(model: nn.Module, images: torch.Tensor, method: str = "beam", prompt: str | None = None,
            **options: Any) -> list[str]:
    """Captions of a batch of (eval-transformed) images, as text without the prompt.

    `prompt` defaults to the one the model was trained with (`data.prompt`, e.g. "a picture of ");
    decoding options as `vlp.generate.generate` (num_beams, max_new_tokens, top_p, ...).
    """
    if hasattr(model, "captions"):  # a model that decodes with its own tokenizer (BLIP-2 stage 2)
        return model.captions(images, prompt, method, **options)
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
