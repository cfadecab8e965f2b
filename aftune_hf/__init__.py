"""aftune_hf: auditable fine-tuning and inference for the Hugging Face stack."""

from .contract import Contract, Recipe, load_contract
from .errors import AftuneError

__version__ = "0.1.0"
__all__ = ["AftuneError", "Contract", "Recipe", "load_contract", "__version__"]
