"""Which recipes can do what an application asks, and a clear error when a model cannot."""

from __future__ import annotations

from collections.abc import Callable

from vlp.models.recipe import Recipe
from vlp.models.registry import recipe_classes, recipes

# What each application needs of a recipe's class (see vlp.models.recipe.Recipe).
ABILITIES: dict[str, tuple[str, Callable[[type[Recipe]], bool]]] = {
    "classify": ("classify images zero-shot", lambda cls: cls.encode_image is not Recipe.encode_image),
    "search": ("embed images and texts", lambda cls: cls.encode_image is not Recipe.encode_image),
    "caption": ("caption images", lambda cls: bool(cls.can_caption)),
    "ask": ("answer questions", lambda cls: cls.answer_texts is not Recipe.answer_texts),
}


def can(model: Recipe, ability: str) -> bool:
    """Whether `model` can do `ability` (a key of ABILITIES)."""
    able = ABILITIES[ability][1]
    return model.can_caption if ability == "caption" else able(type(model))  # BLIP: per its objectives


def require(model: Recipe, ability: str) -> None:
    """TypeError naming the recipes that can, unless `model` can."""
    if not can(model, ability):
        what, able = ABILITIES[ability]
        names = [name for name in recipes() if able(recipe_classes(name)[0])]
        raise TypeError(f"recipe {model.recipe!r} cannot {what}; recipes that can: {', '.join(names)}")
