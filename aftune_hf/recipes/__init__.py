"""Recipes: the model, ``TrainingArguments``, dataset and collator a contract implies.

A recipe is ``def build(contract, output_dir, **overrides) -> Recipe``; provider and verifier call
the same one. Built in: :mod:`.generic` (any causal LM or sequence classifier, configured in the
contract) and :mod:`.causal_lm` (the demo's Llama + byte tokenizer). docs/RECIPES.md has the rules
for writing one.

Example:
    >>> from aftune_hf import audited_trainer
    >>> audited_trainer("contract.yaml", "runs/out", "runs/trace").train()   # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def audited_trainer(contract: Any, output_dir: str | Path, trace_dir: str | Path, *, callbacks: tuple = (),
                    audit: dict[str, Any] | None = None, **overrides: Any) -> Any:  # fmt: skip
    """The contract's Trainer class, built from its recipe, recording into ``trace_dir``.

    ``overrides`` go to the recipe (arguments the contract does not fix: ``eval_strategy``,
    ``logging_steps``, ``save_steps``...; an ``eval_dataset`` goes to the Trainer); ``audit`` to
    :class:`~aftune_hf.AuditCallback` (e.g. ``push_to_hub``); ``callbacks`` run before the recorder.
    """
    from ..callback import AuditCallback
    from ..contract import Contract, load_contract, load_recipe
    from .common import trainer_class

    c = contract if isinstance(contract, Contract) else load_contract(contract)
    eval_dataset = overrides.pop("eval_dataset", None)
    parts = load_recipe(c)(c, str(output_dir), **overrides)
    kwargs = parts.trainer_kwargs() | ({"eval_dataset": eval_dataset} if eval_dataset is not None else {})
    return trainer_class(c)(**kwargs, callbacks=[*callbacks, AuditCallback(c, trace_dir, **(audit or {}))])
