"""aftune_hf: auditable fine-tuning and inference for the Hugging Face stack.

Record with :class:`AuditCallback`, commit inference with :func:`wrap_generate`, publish with
:func:`push_trace`, and check with :func:`verify_trace` / :func:`verify_inference`.
"""

from .callback import AuditCallback
from .contract import Contract, Recipe, load_contract
from .errors import AftuneError
from .generate import wrap_generate
from .hub import push_trace
from .recipes import audited_trainer
from .report import VerificationReport
from .verify import verify_trace
from .verify_inference import verify_inference

__version__ = "0.1.0"
__all__ = [
    "AftuneError",
    "AuditCallback",
    "Contract",
    "Recipe",
    "VerificationReport",
    "__version__",
    "audited_trainer",
    "load_contract",
    "push_trace",
    "verify_inference",
    "verify_trace",
    "wrap_generate",
]
