"""Recipes. Importing this package registers every recipe with the registry."""

from vlp.models import albef, beit3, blip, blip2, caption_lm, clip, coca, siglip, vlmo  # noqa: F401  (register the recipes)
from vlp.models.registry import build_model, create_model, recipes

__all__ = ["build_model", "create_model", "recipes"]
