"""aftune_hf: auditable fine-tuning and inference for the Hugging Face stack."""

from .callback import AuditCallback
from .contract import Contract, Recipe, load_contract
from .errors import AftuneError

__version__ = "0.1.0"
__all__ = ["AftuneError", "AuditCallback", "Contract", "Recipe", "load_contract", "__version__"]
