"""vlp: vision-language pretraining in one small, readable PyTorch codebase."""

from vlp.api import caption, load, save
from vlp.models import create_model, recipes

__version__ = "0.1.0"
__all__ = ["caption", "create_model", "load", "recipes", "save", "__version__"]
