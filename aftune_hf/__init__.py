"""aftune_hf: auditable fine-tuning and inference for the Hugging Face stack.

Record with :class:`AuditCallback`, commit inference with :func:`wrap_generate`, publish with
:func:`push_trace`, and check with :func:`verify_trace` / :func:`verify_inference`.

The public names are imported on first use (PEP 562), so ``aftune contract`` or ``aftune plan``
start without importing torch and transformers.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
_EXPORTS = {
    "AftuneError": "errors",
    "AuditCallback": "callback",
    "Cell": "cells.opening",
    "challenge_cells": "cells.opening",
    "check_cells": "cells.check",
    "open_cells": "cells.opening",
    "Contract": "contract",
    "Recipe": "contract",
    "VerificationReport": "report",
    "audited_trainer": "recipes",
    "load_contract": "contract",
    "push_trace": "hub",
    "verify_inference": "verify_inference",
    "verify_trace": "verify",
    "wrap_generate": "generate",
}
__all__ = [
    "AftuneError", "AuditCallback", "Cell", "Contract", "Recipe", "VerificationReport", "__version__", "audited_trainer",
    "challenge_cells", "check_cells", "load_contract", "open_cells", "push_trace", "verify_inference", "verify_trace",
    "wrap_generate",
]  # fmt: skip

if TYPE_CHECKING:
    from .callback import AuditCallback
    from .cells.check import check_cells
    from .cells.opening import Cell, challenge_cells, open_cells
    from .contract import Contract, Recipe, load_contract
    from .errors import AftuneError
    from .generate import wrap_generate
    from .hub import push_trace
    from .recipes import audited_trainer
    from .report import VerificationReport
    from .verify import verify_trace
    from .verify_inference import verify_inference


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)


class _Package(types.ModuleType):
    """Keeps ``aftune_hf.verify_inference`` the function when its module of the same name is
    imported (the import system binds a submodule on its package; the module stays reachable as
    ``sys.modules["aftune_hf.verify_inference"]`` and through ``from aftune_hf.verify_inference import``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if not (name in _EXPORTS and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
