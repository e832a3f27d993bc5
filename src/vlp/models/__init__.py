"""Recipes. Importing this package registers every recipe with the registry."""

from vlp.models import clip  # noqa: F401  (registers "clip")
from vlp.models.registry import create_model, recipes

__all__ = ["create_model", "recipes"]
