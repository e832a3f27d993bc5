"""Load Hugging Face and open_clip checkpoints as vlp models, and save vlp models for them.

    model = vlp.load("path/to/clip-vit-base-patch32")      # a transformers model directory
    model = vlp.load("openai/clip-vit-base-patch32")        # a hub id (needs the network)
    vlp.save(model, "out", format="hf")                     # CLIPModel.from_pretrained("out") loads it

A format is data: which vlp recipe, how its config maps (`config_from`, `config_to`) and how its
weights are named (`entries`, see `vlp.interop.mapping`). Adding an architecture adds a `Format`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlp.config import from_dict
from vlp.data.tokenizer import Tokenizer
from vlp.interop import blip, blip2, clip, siglip
from vlp.interop.mapping import CheckpointMismatch, Entry, from_vlp, to_vlp
from vlp.models.registry import create_model, recipe_classes

OPEN_CLIP_CONFIG = "open_clip_config.json"


def _nothing_absent(model: nn.Module, architecture: str) -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class Format:
    """How one family of checkpoints maps to vlp. `architecture` is the transformers class a
    checkpoint is (its config's `architectures`) or a vlp model saves as."""

    config_from: Callable[[dict[str, Any], dict[str, int]], tuple[str, dict[str, Any]]]  # -> recipe, config
    entries: Callable[[nn.Module, str], list[Entry]]
    architecture_of: Callable[[dict[str, Any]], str]
    ignore: tuple[str, ...] = ()  # source keys that are buffers or tied copies, not weights
    absent: Callable[[nn.Module, str], tuple[str, ...]] = _nothing_absent  # vlp weights it never holds
    config_class: str | None = None  # transformers config class, for saving
    config_to: Callable[[nn.Module, str], dict[str, Any]] | None = None
    architecture_for: Callable[[nn.Module, str | None], str] | None = None  # (model, task) -> class
    build: Callable[..., nn.Module] | None = None  # (model class, config, hf config, path, tensors, tokenizer=)
    # False (or false of the hf config): the checkpoint's tokenizer is its LM's, which the model holds
    vlp_tokenizer: bool | Callable[[dict[str, Any]], bool] = True
    extra_state: Callable[[nn.Module, str], dict[str, torch.Tensor]] | None = None  # saved tensors kept
    # outside the state dict (BLIP-2's frozen LM), under the checkpoint's names
    write_tokenizer: Callable[[nn.Module, Path], None] | None = None  # saving: writes the tokenizer files


HF_FORMATS = {
    "clip": Format(
        clip.config_from_hf,
        clip.hf_entries,
        clip.architecture,
        ignore=("position_ids",),
        config_class="CLIPConfig",
        config_to=clip.config_to_hf,
        architecture_for=clip.architecture,
    ),
    "blip": Format(
        blip.config_from_hf,
        blip.hf_entries,
        blip.architecture_of,
        absent=blip.absent,
        ignore=("position_ids", "predictions.decoder.weight", "predictions.decoder.bias"),
        config_class="BlipConfig",
        config_to=blip.config_to_hf,
        architecture_for=blip.architecture_for,
    ),
    "blip-2": Format(
        blip2.config_from_hf,
        blip2.hf_entries,
        blip2.architecture,
        absent=blip2.absent,
        ignore=("position_ids",),
        config_class="Blip2Config",
        config_to=blip2.config_to_hf,
        architecture_for=blip2.architecture_for,
        build=blip2.build,
        vlp_tokenizer=blip2.uses_vlp_tokenizer,
        extra_state=blip2.lm_state,
        write_tokenizer=blip2.write_tokenizer,
    ),
    "siglip": Format(
        siglip.config_from_hf,
        siglip.hf_entries,
        siglip.architecture,
        ignore=("position_ids",),
        config_class="SiglipConfig",
        config_to=siglip.config_to_hf,
        architecture_for=siglip.architecture,
    ),
}
OPEN_CLIP = Format(clip.config_from_open_clip, clip.open_clip_entries, clip.architecture, ignore=("attn_mask",))
OPEN_CLIP_SIGLIP = Format(siglip.config_from_open_clip, siglip.open_clip_entries, siglip.architecture)
OPEN_CLIP_SAVABLE = {  # recipe -> (its open_clip model_cfg, its weight names)
    "clip": (clip.config_to_open_clip, clip.open_clip_entries),
    "siglip": (siglip.config_to_open_clip, siglip.open_clip_entries),
}
SAVABLE = {
    "clip": HF_FORMATS["clip"],
    "blip": HF_FORMATS["blip"],
    "blip_vqa": HF_FORMATS["blip"],
    "siglip": HF_FORMATS["siglip"],
    "blip2_stage1": HF_FORMATS["blip-2"],
    "blip2_stage2": HF_FORMATS["blip-2"],
}


def is_pretrained_dir(path: Path) -> bool:
    """A transformers or open_clip checkpoint directory (rather than a vlp run)."""
    return not (path / "config.yaml").is_file() and any(
        (path / name).is_file() for name in ("config.json", OPEN_CLIP_CONFIG)
    )


def resolve(source: str | Path) -> Path:
    """A local directory, or a hub id downloaded (or found in the cache) by `huggingface_hub`."""
    path = Path(source)
    if path.exists():
        return path
    if str(source).count("/") != 1 or path.parent.is_dir() or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{source}: no such directory (and not a hub id of the form org/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as err:
        raise FileNotFoundError(
            f"could not get {source} from the Hugging Face hub ({type(err).__name__}: {err}). Offline, "
            f"download it elsewhere (`huggingface-cli download {source}`: config.json, model.safetensors "
            f"and the tokenizer files) and pass the directory instead"
        ) from err


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint directory: safetensors (single or sharded) or PyTorch .bin."""
    from safetensors.torch import load_file

    for index_name, loader in (
        ("model.safetensors.index.json", load_file),
        ("pytorch_model.bin.index.json", _load_bin),
    ):
        index = path / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in loader(str(path / shard)).items()}
    for name in ("model.safetensors", "open_clip_model.safetensors"):
        if (path / name).is_file():
            return load_file(str(path / name))
    for name in ("pytorch_model.bin", "open_clip_pytorch_model.bin"):
        if (path / name).is_file():
            return _load_bin(str(path / name))
    raise FileNotFoundError(f"{path}: no weights (model.safetensors, its sharded index, or pytorch_model.bin)")


def _load_bin(file: str) -> dict[str, torch.Tensor]:
    return torch.load(file, map_location="cpu", weights_only=True)


def load_tokenizer(path: Path) -> Tokenizer | None:
    """The checkpoint's tokenizer: tokenizer.json, else vocab/merges files through transformers."""
    if (path / "tokenizer.json").is_file():
        return Tokenizer.load(path / "tokenizer.json")
    if not any((path / f).is_file() for f in ("vocab.json", "vocab.txt")):
        return None
    from transformers import AutoTokenizer

    return Tokenizer.from_library(AutoTokenizer.from_pretrained(str(path)).backend_tokenizer, str(path))


def detect(path: Path) -> tuple[Format, dict[str, Any]]:
    """The format of a checkpoint directory and its config."""
    if (path / OPEN_CLIP_CONFIG).is_file():
        model_cfg = json.loads((path / OPEN_CLIP_CONFIG).read_text())["model_cfg"]
        return (OPEN_CLIP_SIGLIP if siglip.is_open_clip_siglip(model_cfg) else OPEN_CLIP), model_cfg
    config = json.loads((path / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in HF_FORMATS:
        raise ValueError(
            f"{path / 'config.json'}: model_type {model_type!r} is not supported; "
            f"vlp loads {sorted(HF_FORMATS)} and open_clip CLIP and SigLIP (see docs/interop.md)"
        )
    return HF_FORMATS[model_type], config


def load_pretrained(source: str | Path, strict: bool = True) -> nn.Module:
    """A vlp model (eval mode, with `.tokenizer`) from a transformers/open_clip checkpoint.

    Every checkpoint tensor must find its vlp weight and every vlp weight its tensor; otherwise a
    `CheckpointMismatch` names the keys (`strict=False`: a warning, the rest is loaded).
    """
    path = resolve(source)
    fmt, config = detect(path)
    wants_tokenizer = fmt.vlp_tokenizer(config) if callable(fmt.vlp_tokenizer) else fmt.vlp_tokenizer
    tokenizer = load_tokenizer(path) if wants_tokenizer else None
    recipe, model_cfg = fmt.config_from(config, tokenizer.special_ids() if tokenizer else {})
    source, architecture = read_state_dict(path), fmt.architecture_of(config)
    if fmt.build is None:
        model = create_model(recipe, model_cfg, tokenizer=tokenizer)
    else:
        model_cls, config_cls = recipe_classes(recipe)
        model_cfg = from_dict(config_cls, model_cfg, where="model.")
        model = fmt.build(model_cls, model_cfg, config, path, source, tokenizer=tokenizer)
    target = model.state_dict()
    state, report = to_vlp(source, fmt.entries(model, architecture), target, ignore=fmt.ignore)
    report.missing = [k for k in report.missing if not k.startswith(fmt.absent(model, architecture))]
    report.check(str(path), strict)
    model.load_state_dict(state, strict=False)
    return model.eval()


def save_hf(model: nn.Module, out: str | Path, task: str | None = None) -> Path:
    """Write `model` as a transformers checkpoint directory (config, safetensors, tokenizer.json).

    `task` picks the transformers model where one vlp model maps to several (a BLIP with ITC,
    ITM and LM: "retrieval" or "captioning"). BLIP-2 stage 2 writes its frozen LM and the LM's
    tokenizer with it."""
    import transformers

    fmt = SAVABLE.get(model.recipe)
    if fmt is None:
        raise ValueError(
            f"recipe {model.recipe!r} cannot be saved as a transformers checkpoint yet (supported: {sorted(SAVABLE)})"
        )
    architecture = fmt.architecture_for(model, task)
    config = getattr(transformers, fmt.config_class)(**fmt.config_to(model, architecture))
    hf_model = getattr(transformers, architecture)(config)
    target = hf_model.state_dict()
    state = from_vlp(model.state_dict(), fmt.entries(model, architecture), target)
    if fmt.extra_state is not None:
        state.update(fmt.extra_state(model, architecture))
    missing = [k for k in target if k not in state and not k.endswith(fmt.ignore)]
    if missing:
        raise CheckpointMismatch(f"no vlp weight for transformers' {missing[:8]}")
    hf_model.load_state_dict(state, strict=False)
    out = Path(out)
    hf_model.save_pretrained(out)
    tokenizer = model.tokenizer
    if fmt.write_tokenizer is not None:
        fmt.write_tokenizer(model, out)
    elif tokenizer is not None:
        tokenizer.save(out / "tokenizer.json")
    return out


def save_open_clip(model: nn.Module, out: str | Path) -> Path:
    """Write a vlp CLIP (ViT or ResNet image tower) or SigLIP as an open_clip directory
    (`open_clip_config.json`, `open_clip_model.safetensors`, and vlp's tokenizer.json):
    `open_clip.create_model("local-dir:OUT")` loads it, and so does `vlp.load`."""
    import open_clip
    from safetensors.torch import save_file

    if model.recipe not in OPEN_CLIP_SAVABLE:
        raise ValueError(f"recipe {model.recipe!r} has no open_clip format (open_clip has {sorted(OPEN_CLIP_SAVABLE)})")
    config_to, entries = OPEN_CLIP_SAVABLE[model.recipe]
    model_cfg = config_to(model)
    model_class = open_clip.model.CustomTextCLIP if model_cfg.get("custom_text") else open_clip.model.CLIP
    with torch.device("meta"):
        target = model_class(**{k: v for k, v in model_cfg.items() if k != "custom_text"}).state_dict()
    state = from_vlp(model.state_dict(), entries(model), target)
    missing = [k for k in target if k not in state]
    if missing:
        raise CheckpointMismatch(f"no vlp weight for open_clip's {missing[:8]}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "open_clip_model.safetensors"))
    (out / OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": model_cfg}, indent=2))
    if model.tokenizer is not None:
        model.tokenizer.save(out / "tokenizer.json")
    return out
