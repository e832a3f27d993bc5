"""vlp: vision-language pretraining in one small, readable PyTorch codebase."""

from vlp.api import caption, classify, load, save
from vlp.models import create_model, recipes

__version__ = "0.1.0"
__all__ = ["caption", "classify", "create_model", "load", "recipes", "save", "__version__"]
