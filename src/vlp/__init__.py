"""vlp: vision-language pretraining in one small, readable PyTorch codebase."""

from vlp.api import caption, classify, load, save
from vlp.models import create_model, recipes

__version__ = "0.1.0"
__all__ = ["caption", "classify", "create_model", "load", "recipes", "save", "__version__"]


def __getattr__(name: str):
    """`vlp.Index` (an index of an image collection), imported on first use: it needs faiss."""
    if name == "Index":
        from vlp.apps.index import Index

        return Index
    raise AttributeError(f"module 'vlp' has no attribute {name!r}")
