"""The Python entry points: `vlp.create_model`, `vlp.load`, `vlp.save`, `vlp.caption` and
`vlp.classify`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from vlp.apps.classify import classify  # noqa: F401  (vlp.classify)
from vlp.config import RunConfig, from_dict, load_yaml, to_dict
from vlp.data.tokenizer import Tokenizer
from vlp.interop.pretrained import is_pretrained_dir, load_pretrained, save_hf, save_open_clip
from vlp.models.recipe import Recipe
from vlp.models.registry import build_model
from vlp.train.checkpoint import load_weights, run_of, save_checkpoint, weights_of
from vlp.train.rundir import RunError, holds_run


def load(path: str | Path, device: str = "cpu", strict: bool = True) -> Recipe:
    """Load a model from a vlp run directory (its newest checkpoint) or checkpoint directory, a
    transformers or open_clip checkpoint directory, or a Hugging Face hub id (docs/interop.md).

    The returned model is in eval mode and holds its tokenizer (`model.tokenizer`) and, for a vlp
    run, its run config (`model.run_config`). `strict`
    (checkpoints of other libraries): unmatched weights are an error rather than a warning.
    """
    if is_pretrained_dir(Path(path)) or not Path(path).exists():
        return load_pretrained(path, strict=strict).to(device)
    run_dir, weights = run_of(path), weights_of(path)
    cfg = from_dict(RunConfig, load_yaml(run_dir / "config.yaml"))
    tokenizer = Tokenizer.load(run_dir / "tokenizer.json")
    model = build_model(cfg, tokenizer)
    load_weights(model, weights)
    return model.to(device).eval()


def save(model: Recipe, out: str | Path, format: str = "vlp", task: str | None = None) -> Path:
    """Write `model` (with its `.tokenizer`) to directory `out`: `format="vlp"` as a run that
    `vlp.load`, `vlp eval` and `vlp train --init` take; `format="hf"` as a transformers checkpoint
    (`task`: which transformers model a BLIP with all three objectives becomes, "retrieval" or
    "captioning"); `format="open_clip"` as an open_clip directory (CLIP, SigLIP)."""
    if format == "hf":
        return model.save_hf(Path(out)) if model.writes_own_hf else save_hf(model, out, task)
    if format == "open_clip":
        return save_open_clip(model, out)
    if format != "vlp":
        raise ValueError(f"format must be 'vlp', 'hf' or 'open_clip', got {format!r}")
    if model.tokenizer is None:
        raise ValueError(
            "the model has no tokenizer (model.tokenizer), which a vlp run needs: load "
            "the checkpoint from a directory with tokenizer files"
        )
    out = Path(out)
    if holds_run(out):  # its checkpoints would outrank (and prune) the one written here
        raise RunError(f"{out} already holds a vlp run; save into a fresh directory")
    out.mkdir(parents=True, exist_ok=True)
    model.save_files(out)  # e.g. BLIP-2 stage 2's frozen LM, kept outside the state dict
    config = RunConfig(recipe=model.recipe, model=to_dict(model.cfg))
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    model.tokenizer.save(out / "tokenizer.json")
    save_checkpoint(out, 0, model, {"step": 0})
    return out


def caption(
    model: Recipe, images: torch.Tensor, method: str = "beam", prompt: str | None = None, **options: Any
) -> list[str]:
    """Captions of a batch of (eval-transformed) images, as text without the prompt: the
    model's `caption` (see `vlp.models.recipe.Recipe.caption`)."""
    return model.caption(images, prompt=prompt, method=method, **options)
