"""Checkpoints that a crash or kill can never corrupt.

A checkpoint is a directory `checkpoints/step_XXXXXXX/` holding `model.safetensors` (weights)
and the training state (optimizer, scheduler, RNG states, data position) as `state.json` plus
the state's tensors in `state.safetensors`. Nothing in a checkpoint is pickled, so a run
directory from elsewhere cannot run code when it is resumed; the `state.pt` of older versions is
read with `torch.load(weights_only=True)`, which unpickles tensors and plain data only. A run
trained with `train.parallel: fsdp` writes `sharded/` (Distributed Checkpoint, one file of
shards per rank) in place of `model.safetensors`; `read_weights` consolidates it, and it is read
without unpickling anything but DCP's own metadata records (see `vlp.train.fsdp`).

A checkpoint is written under a temporary name, flushed, then renamed into place;
`checkpoints/latest` (itself replaced atomically) names the newest complete one. A kill at any
moment leaves the last good one; a failed write (a full disk) removes its temporary directory.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

SHARDED = "sharded"  # an FSDP checkpoint's DCP directory (vlp.train.fsdp), in place of model.safetensors


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    _fsync_file(tmp)
    os.replace(tmp, path)


def save_weights(model: nn.Module, path: Path) -> None:
    """Model weights as safetensors, every name stored: a tied weight (BLIP's decoder shares
    the encoder's) is written under each of its names, so a recipe that unties it loads it."""
    state, stored = {}, set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        if tensor.data_ptr() in stored:
            tensor = tensor.clone()
        stored.add(tensor.data_ptr())
        state[name] = tensor.contiguous().cpu()
    save_file(state, str(path), metadata={"recipe": getattr(model, "recipe", "")})


def read_weights(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A checkpoint's full weights: `model.safetensors`, or a sharded checkpoint's `sharded/`
    directory (`train.parallel: fsdp`) consolidated in this process (`vlp.train.fsdp`)."""
    if Path(path).is_dir():
        from vlp.train.fsdp import consolidated_weights

        return consolidated_weights(Path(path), device)
    return load_file(str(path), device=device)


def load_weights(model: nn.Module, path: Path, strict: bool = True) -> tuple[list[str], list[str]]:
    """Load safetensors (or sharded) weights; returns (missing, unexpected) names, an error if `strict`."""
    device = str(next(model.parameters()).device)
    missing, unexpected = model.load_state_dict(read_weights(path, device), strict=False)
    if strict and (missing or unexpected):
        raise KeyError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")
    return missing, unexpected


def load_matching_weights(model: nn.Module, path: Path) -> dict[str, list[str]]:
    """Load every tensor whose name and shape match (fine-tuning another recipe from a run);
    returns the names that were missing, unexpected, or of another shape."""
    own = model.state_dict()
    weights = read_weights(path)
    report = {
        "missing": [k for k in own if k not in weights],
        "unexpected": [k for k in weights if k not in own],
        "other shape": [k for k in weights if k in own and weights[k].shape != own[k].shape],
    }
    usable = {k: v for k, v in weights.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(usable, strict=False)
    return report


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the directory."""


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` as JSON data, its tensors moved to `tensors` and referenced by name; tuples and
    dicts with non-string keys (an optimizer's parameter ids) are tagged so they come back."""
    if torch.is_tensor(value):
        name = str(len(tensors))
        tensors[name] = value.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"__items__": [[k, _encode(v, tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"training state holds a {type(value).__name__}, which cannot be stored without pickle")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `_encode`."""
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {k: _decode(v, tensors) for k, v in value["__items__"]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def save_state(state: dict[str, Any], directory: Path) -> None:
    """Write a training state as `state.json` and `state.safetensors` (no pickle)."""
    tensors: dict[str, torch.Tensor] = {}
    (directory / "state.json").write_text(json.dumps(_encode(state, tensors)))
    save_file(tensors, str(directory / "state.safetensors"))


def save_checkpoint(
    run_dir: Path, step: int, model: nn.Module | None, state: dict[str, Any], keep: int = 2, sharded: Path | None = None
) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, keep the newest `keep` (0:
    all). A failed write (a full disk) leaves no temporary files and raises CheckpointError.
    `sharded`: a DCP directory the ranks wrote (FSDP), moved in as `sharded/` in place of the
    weights of `model` (None)."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        if model is not None:
            save_weights(model, tmp / "model.safetensors")
        save_state(state, tmp)
        for name in ("model.safetensors", "state.json", "state.safetensors"):
            if (tmp / name).is_file():
                _fsync_file(tmp / name)
        if sharded is not None:
            os.replace(sharded, tmp / SHARDED)  # its files were fsynced by DCP
            _fsync_dir(tmp)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if sharded is not None:
            shutil.rmtree(sharded, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint step {step} in {root}: {err.strerror or err}; "
            f"the previous checkpoint is intact"
        ) from None
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    write_text_atomic(root / "latest", final.name)
    for old in sorted(root.glob("step_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if any((path / name).is_file() for name in ("state.json", "state.pt")) else None


def run_of(path: Path) -> Path:
    """The run directory of a run or of one of its checkpoint directories."""
    path = Path(path)
    run_dir = path.parent.parent if is_checkpoint(path) else path
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{path} is not a vlp run or checkpoint directory (no config.yaml)")
    return run_dir


def is_checkpoint(path: Path) -> bool:
    """Whether `path` is a checkpoint directory (with weights, or with sharded weights)."""
    return (Path(path) / "model.safetensors").is_file() or (Path(path) / SHARDED / ".metadata").is_file()


def weights_of(path: Path) -> Path:
    """The weights of a checkpoint directory, or of a run's newest checkpoint: its
    `model.safetensors`, or its `sharded/` directory (an FSDP run; `read_weights` takes both)."""
    path = Path(path)
    checkpoint = path if is_checkpoint(path) else latest_checkpoint(run_of(path))
    if checkpoint is None:
        raise FileNotFoundError(f"{path} has no checkpoint yet")
    return checkpoint / "model.safetensors" if (checkpoint / "model.safetensors").is_file() else checkpoint / SHARDED


def load_state(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's training state, without unpickling anything but tensors and plain data."""
    if (checkpoint / "state.json").is_file():
        return _decode(
            json.loads((checkpoint / "state.json").read_text()), load_file(str(checkpoint / "state.safetensors"))
        )
    try:  # written by vlp 0.1 before state.json
        return torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = next((line for line in str(err).splitlines() if "GLOBAL" in line), "").strip()
        raise CheckpointError(
            f"{checkpoint / 'state.pt'} holds objects other than tensors and plain "
            f"data; refusing to unpickle them (they could run code). {found}"
        ) from None
