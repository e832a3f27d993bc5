"""Configs as data: YAML files turned into nested dataclasses, with `key=value` overrides.

Every recipe has `configs/<recipe>/<size>.yaml` with three sections: `model` (the recipe's
config dataclass), `data` (`DataConfig`) and `train` (`TrainConfig`). Unknown keys are errors
that name the full dotted key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_MAX_PIXELS = 50_000_000  # about 7000 x 7000: larger images are skipped, never decoded


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; names the key at fault."""


@dataclass
class DataConfig:
    path: str = "data/shapes"
    train_split: str = "train"
    format: str | None = None  # auto-detected when None
    batch_size: int = 128
    workers: int = 1
    crop_scale: tuple[float, float] = (0.85, 1.0)
    strict: bool = False
    prompt: str = ""  # text put before every caption and not scored by LM losses ("a picture of ")
    # caption | qa: question-answer pairs of each sample's metadata (VQA) | caption+qa: both, as text
    text: str = "caption"
    # Listed image paths must lie inside this folder (default: the listing's own folder); set it
    # to an absolute folder (even "/") to read images listed elsewhere. See docs/reliability.md.
    image_root: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are skipped, not decoded (pixel bombs)
    # Stream webdataset shards from disk instead of loading them (vlp.data.streaming, docs/scale.md)
    streaming: bool = False
    resampled: bool = False  # streaming: shards drawn with replacement; epochs of samples_per_epoch
    # streaming: several shard sets mixed by weight, [{path: ..., weight: 1.0}, ...]; default [{path}]
    sources: list[dict[str, Any]] = field(default_factory=list)
    samples_per_epoch: int | None = None  # streaming: default, the samples in the shards

    def __post_init__(self) -> None:
        _check_bounds(self, "data", positive=("batch_size", "max_pixels"), non_negative=("workers",))
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ConfigError(
                f"data.crop_scale must be [low, high] with 0 < low <= high <= 1, got {list(self.crop_scale)}"
            )
        _check_streaming(self)


def _check_streaming(data: DataConfig) -> None:
    """ConfigError naming the first streaming key that is out of place or out of bounds."""
    if not data.streaming:
        for key in ("resampled", "sources", "samples_per_epoch"):
            if getattr(data, key):
                raise ConfigError(f"data.{key} needs data.streaming: true")
        return
    if data.samples_per_epoch is not None and (isinstance(data.samples_per_epoch, bool) or data.samples_per_epoch <= 0):
        raise ConfigError(f"data.samples_per_epoch must be greater than 0, got {data.samples_per_epoch}")
    if not isinstance(data.sources, list):
        raise ConfigError(f"data.sources must be a list of {{path, weight}}, got {data.sources!r}")
    for i, source in enumerate(data.sources):
        if not isinstance(source, dict) or not isinstance(source.get("path"), str) or set(source) - {"path", "weight"}:
            raise ConfigError(f"data.sources[{i}] must be {{path: str, weight: number}}, got {source!r}")
        weight = source.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
            raise ConfigError(f"data.sources[{i}].weight must be a number greater than 0, got {weight!r}")


LOG_SINKS = ("jsonl", "tensorboard")
PARALLEL_MODES = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 5e-4
    min_lr: float = 0.0
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 1.0
    accum: int = 1
    grad_checkpointing: bool = False  # recompute each transformer block in backward: less memory, same gradients
    precision: str = "fp32"  # fp32 | bf16 (autocast) | auto: bf16 where it is faster (vlp.train.precision)
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 250
    keep_checkpoints: int = 2
    loss_weights: dict[str, float] = field(default_factory=dict)
    freeze: list[str] = field(default_factory=list)  # parameter-name patterns (fnmatch) kept fixed
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    device: str = "auto"  # auto: cuda when available, else cpu
    # Seconds a rank waits for the others in a collective before the job stops with an error
    # (a frozen or vanished peer); torch.distributed's own default is 30 minutes.
    dist_timeout: float = 600.0
    # Where training logs go: metrics.jsonl (always: the run's record, read by report and resume)
    # and, with "tensorboard", TensorBoard scalars in RUN/tensorboard.
    log_to: list[str] = field(default_factory=lambda: ["jsonl"])
    # ddp: every rank holds the whole model; fsdp: weights, gradients and optimizer state sharded
    # over the ranks (FSDP2), checkpoints sharded (vlp.train.fsdp, docs/scale.md)
    parallel: str = "ddp"

    def __post_init__(self) -> None:
        _check_bounds(
            self,
            "train",
            positive=("steps", "lr", "accum", "log_every", "ckpt_every", "dist_timeout"),
            non_negative=("warmup", "threads", "keep_checkpoints"),
        )  # keep 0: keep every checkpoint
        unknown = set(self.log_to) - set(LOG_SINKS)
        if unknown or "jsonl" not in self.log_to:
            raise ConfigError(
                f"train.log_to must list jsonl (the run's record) and may add tensorboard, got {self.log_to}"
            )
        if self.parallel not in PARALLEL_MODES:
            raise ConfigError(f"train.parallel must be one of {', '.join(PARALLEL_MODES)}, got {self.parallel!r}")


def _check_bounds(section: Any, name: str, positive: tuple[str, ...], non_negative: tuple[str, ...]) -> None:
    """ConfigError naming the first key of `section` out of its bounds (a zero step count or
    batch size would otherwise fail far from the config, or loop forever)."""
    for keys, in_bounds, words in (
        (positive, lambda v: v > 0, "greater than 0"),
        (non_negative, lambda v: v >= 0, "0 or more"),
    ):
        for key in keys:
            value = getattr(section, key)
            if not in_bounds(value):
                raise ConfigError(f"{name}.{key} must be {words}, got {value}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def recipe_config_path(recipe: str, size: str = "tiny") -> Path:
    """The shipped config for a recipe and size, e.g. `configs/clip/tiny.yaml`."""
    path = CONFIG_DIR / recipe / f"{size}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in (CONFIG_DIR / recipe).glob("*.yaml"))
        raise ConfigError(f"no config {size!r} for recipe {recipe!r} (shipped: {shipped})")
    return path


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return config


def from_dict(cls: type, data: dict[str, Any] | None, where: str = "") -> Any:
    """Build dataclass `cls` from a dict, recursing into nested dataclasses; unknown keys raise."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[where + k for k in unknown]}; "
            f"valid keys in {where or 'this section'}: {sorted(names)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}{name}")
    return cls(**kwargs)


def _coerce_tuple(args: tuple, value: Any, where: str) -> tuple:
    """A list as `tuple[X, ...]` (any length) or `tuple[X, Y]` (exactly that many items)."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        args = (args[0],) * len(value)
    elif len(args) != len(value):
        raise ConfigError(f"{where}: expected a list of {len(args)} items, got {len(value)}: {value!r}")
    return tuple(_coerce(a, v, where) for a, v in zip(args, value))


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to a field's declared type (dataclasses, tuples, numbers)."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(hint, value, where + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is tuple:
        return _coerce_tuple(typing.get_args(hint), value, where)
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError as err:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from err
    if hint in (int, bool, str) and not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def to_dict(obj: Any) -> Any:
    """A dataclass config as plain YAML-friendly data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


@dataclass
class RunConfig:
    """Everything a training run needs; saved as `config.yaml` in the run directory."""

    recipe: str = "clip"
    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_run_config(
    recipe: str | None = None,
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    pretrained: dict[str, Any] | None = None,
    model_fields: Callable[[str], set[str]] | None = None,
) -> RunConfig:
    """A run config from a YAML file (default: the named config's tiny.yaml) plus overrides.

    A shipped config may name another recipe: `configs/blip_caption/` fine-tunes `blip`.
    `pretrained` (the config of the run `--init` starts from): its model section lies under the
    file's, which then only needs what the fine-tuning changes; but the shipped config of the
    pretrained run's own recipe (`configs/clip/` to continue a `clip` run) describes a
    from-scratch architecture, so its model section is left out (overrides still apply).
    `model_fields(recipe)` names a recipe's model config fields (`vlp.models.config_fields`);
    it is needed when `pretrained` is of another recipe.
    """
    explicit = path is not None
    if path is None:
        if recipe is None:
            raise ConfigError("give a recipe or a config file")
        path = recipe_config_path(recipe)
    data = load_yaml(path)
    if recipe is not None:
        data.setdefault("recipe", recipe)
        if explicit and data["recipe"] != recipe:
            raise ConfigError(f"{path}: config is for recipe {data['recipe']!r}, not {recipe!r}")
    if pretrained is not None:
        data["model"] = _model_from_pretrained(
            pretrained, data, not explicit and data["recipe"] == recipe, model_fields
        )
    apply_overrides(data, overrides or [])
    return from_dict(RunConfig, data)


def _model_from_pretrained(
    pretrained: dict[str, Any], data: dict[str, Any], own: bool, model_fields: Callable[[str], set[str]] | None
) -> dict[str, Any]:
    """The model section of a run that starts from `pretrained` (see `load_run_config`). From
    another recipe only the sections both configs have carry over (a CLIP's `vision` tower
    for BLIP-2)."""
    base = pretrained.get("model") or {}
    if pretrained.get("recipe") != data["recipe"]:
        if model_fields is None:
            raise ValueError("load_run_config: a pretrained run of another recipe needs model_fields")
        fields = model_fields(data["recipe"])
        base = {k: v for k, v in base.items() if k in fields}
    elif own:
        return dict(base)
    return deep_merge(base, data.get("model") or {})


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`base` updated by `top`, nested dicts merged key by key."""
    merged = dict(base)
    for key, value in top.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = deep_merge(merged[key], value) if both_dicts else value
    return merged
