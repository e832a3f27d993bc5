"""Recipe registry: a name -> (model class, config dataclass), filled by `@register`."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from vlp.config import from_dict

_RECIPES: dict[str, tuple[type[nn.Module], type]] = {}


def register(name: str, config_cls: type) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make a recipe available to `create_model(name, ...)` and the CLI."""

    def add(model_cls: type[nn.Module]) -> type[nn.Module]:
        _RECIPES[name] = (model_cls, config_cls)
        model_cls.recipe = name
        return model_cls

    return add


def recipes() -> list[str]:
    return sorted(_RECIPES)


def recipe_classes(name: str) -> tuple[type[nn.Module], type]:
    if name not in _RECIPES:
        raise KeyError(f"unknown recipe {name!r}; available: {recipes()}")
    return _RECIPES[name]


def create_model(recipe: str, config: dict[str, Any] | Any | None = None) -> nn.Module:
    """Build a recipe's model from its config (a dataclass or a plain dict of its fields)."""
    model_cls, config_cls = recipe_classes(recipe)
    if not isinstance(config, config_cls):
        config = from_dict(config_cls, config, where="model.")
    return model_cls(config)


def text_config(model: nn.Module) -> Any:
    """The config of a model's text tower (`cfg.text`, or the section its `text_section` names)."""
    return getattr(model.cfg, getattr(model, "text_section", "text"))
