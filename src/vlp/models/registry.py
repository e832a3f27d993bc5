"""Recipe registry: a name -> (model class, config dataclass), filled by `@register`, and the
one factory that builds a recipe's model (`create_model`, `build_model` for a run config)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from vlp.config import RunConfig, from_dict

if TYPE_CHECKING:
    from vlp.data.tokenizer import Tokenizer
    from vlp.models.recipe import Recipe

_RECIPES: dict[str, tuple[type[Recipe], type]] = {}


def register(name: str, config_cls: type) -> Callable[[type[Recipe]], type[Recipe]]:
    """Class decorator: make a recipe available to `create_model(name, ...)` and the CLI."""

    def add(model_cls: type[Recipe]) -> type[Recipe]:
        _RECIPES[name] = (model_cls, config_cls)
        model_cls.recipe = name
        return model_cls

    return add


def recipes() -> list[str]:
    return sorted(_RECIPES)


def recipe_classes(name: str) -> tuple[type[Recipe], type]:
    if name not in _RECIPES:
        raise KeyError(f"unknown recipe {name!r}; available: {recipes()}")
    return _RECIPES[name]


def config_fields(recipe: str) -> set[str]:
    """The field names of a recipe's model config."""
    return {f.name for f in fields(recipe_classes(recipe)[1])}


def create_model(
    recipe: str,
    config: dict[str, Any] | Any | None = None,
    tokenizer: Tokenizer | None = None,
    run_config: RunConfig | None = None,
) -> Recipe:
    """Build a recipe's model from its config (a dataclass or a plain dict of its fields), with
    the tokenizer and run config it was trained with, where known."""
    model_cls, config_cls = recipe_classes(recipe)
    if not isinstance(config, config_cls):
        config = from_dict(config_cls, config, where="model.")
    return model_cls(config, tokenizer=tokenizer, run_config=run_config)


def build_model(cfg: RunConfig, tokenizer: Tokenizer) -> Recipe:
    """The model of a run config, its text vocabulary sized to the tokenizer (and, for recipes
    that use special tokens such as [MASK] or [DEC], their ids in this vocabulary); the model
    holds both."""
    model_cls = recipe_classes(cfg.recipe)[0]
    model_cfg, section = dict(cfg.model), model_cls.text_section
    model_cfg[section] = {**model_cfg.get(section, {}), "vocab_size": tokenizer.vocab_size}
    if "tokens" in config_fields(cfg.recipe):
        model_cfg["tokens"] = {**tokenizer.special_ids(), **model_cfg.get("tokens", {})}
    return create_model(cfg.recipe, model_cfg, tokenizer=tokenizer, run_config=cfg)
