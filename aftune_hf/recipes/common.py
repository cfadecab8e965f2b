"""What every recipe needs: the contract's Trainer class and its arguments, built the one way.

A recipe is ``def build(contract, output_dir, **overrides) -> Recipe``. The verifier calls it with
overrides that keep a replay quiet (``save_strategy="no"``, ``eval_strategy="no"``,
``report_to="none"``...); :func:`training_arguments` applies the contract's fields, its
``trainer_args`` and those overrides, and refuses an override of a field the contract fixes.

Example:
    >>> from aftune_hf.recipes.common import trainer_class, training_arguments
    >>> args = training_arguments(contract, "runs/out", logging_steps=10)      # doctest: +SKIP
    >>> trainer_class(contract).__name__                                        # doctest: +SKIP
    'Trainer'
"""

from __future__ import annotations

import copy
import typing
from typing import Any

from ..contract import Contract, load_object
from ..errors import ConfigError

# what the Trainer does that is not the agreed computation: off unless the recipe's caller says otherwise
DEFAULTS: dict[str, Any] = {"report_to": "none", "save_strategy": "no", "logging_steps": 1, "dataloader_num_workers": 0}
# TrainingArguments fields that change the computation besides the contract's training section: the
# run must have the value the contract's recipe builds (its trainer_args, else the default)
COMPUTATION_FIELDS = (
    "lr_scheduler_kwargs", "optim_args", "optim_target_modules", "average_tokens_across_devices", "label_smoothing_factor",
    "tf32", "torch_compile", "torch_compile_backend", "torch_compile_mode", "use_liger_kernel", "neftune_noise_alpha",
    "auto_find_batch_size", "full_determinism", "dataloader_drop_last", "remove_unused_columns", "label_names",
    "train_sampling_strategy", "length_column_name", "ignore_data_skip", "accelerator_config", "fsdp", "fsdp_config",
    "deepspeed",
)  # fmt: skip
# fields of a TrainingArguments subclass (SFTConfig) that do not change the computation; all its others do
HARMLESS_EXTRA_FIELDS = frozenset({"dataset_num_proc", "eval_packing", "trust_remote_code", "model_init_kwargs"})


def trainer_class(contract: Contract) -> type:
    """The ``transformers.Trainer`` (sub)class the contract names (``module:Class``)."""
    import transformers

    cls = load_object(contract.trainer, "trainer_not_found")
    if not (isinstance(cls, type) and issubclass(cls, transformers.Trainer)):
        raise ConfigError("trainer_not_found", f"{contract.trainer} is not a transformers.Trainer subclass")
    return cls


def arguments_class(trainer: type) -> type:
    """The most specific ``TrainingArguments`` subclass a Trainer's ``args`` accepts (``SFTConfig``
    for ``trl.SFTTrainer``), from its ``__init__`` annotation."""
    from transformers import TrainingArguments

    try:
        hint = typing.get_type_hints(trainer.__init__).get("args")
    except Exception:  # noqa: BLE001 - unresolvable annotations: the base class
        hint = None
    options = [a for a in (typing.get_args(hint) or (hint,)) if isinstance(a, type) and issubclass(a, TrainingArguments)]
    return max(options, key=lambda a: len(a.__mro__), default=TrainingArguments)


def training_arguments(contract: Contract, output_dir: str, **overrides: Any) -> Any:
    """The Trainer's arguments: the contract's training fields and ``trainer_args``, then
    :data:`DEFAULTS`, then ``overrides`` (which may not touch what the contract fixes)."""
    import torch

    cls = arguments_class(trainer_class(contract))
    fixed = contract_fields(contract, cls)
    clash = sorted(set(overrides) & set(fixed))
    if clash:
        raise ConfigError("override_contract", f"the contract fixes {clash}; change the contract, not the recipe call")
    kwargs = {**DEFAULTS, "use_cpu": not torch.cuda.is_available(), **overrides}
    try:
        return cls(output_dir=output_dir, **fixed, **kwargs)
    except TypeError as e:
        raise ConfigError("invalid_trainer_args", f"{cls.__name__}: {e}") from None


def contract_fields(contract: Contract, cls: type) -> dict[str, Any]:
    """The arguments fields the contract fixes for arguments class ``cls``: its training section,
    its padding where ``cls`` pads itself (``SFTConfig.max_length``/``pad_to_multiple_of``), and
    its ``trainer_args``."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    p = contract.training.padding
    padding = {k: v for k, v in {"max_length": p.max_length, "pad_to_multiple_of": p.pad_to_multiple_of}.items() if k in names}
    # a copy: TrainingArguments normalises some in place (fsdp_config), which must not change the contract
    return {**contract.training_arguments_kwargs(), **padding, **copy.deepcopy(dict(contract.trainer_args))}


def check_recipe_args(contract: Contract, allowed: set[str]) -> None:
    """Refuse ``recipe_args`` a recipe does not know."""
    unknown = set(contract.recipe_args) - allowed
    if unknown:
        raise ConfigError("invalid_recipe_args", f"unknown recipe_args {sorted(unknown)} (allowed: {sorted(allowed)})")


def apply_peft(model: Any, contract: Contract, task_type: str) -> Any:
    """Wrap ``model`` with the contract's LoRA/DoRA adapter (``task_type`` unless the contract sets one).

    Call :func:`transformers.set_seed` first: the adapter's initial weights are drawn from the global RNG.
    """
    if contract.peft is None:
        return model
    from peft import LoraConfig, get_peft_model

    p = contract.peft
    config = LoraConfig(
        r=p.r, lora_alpha=p.lora_alpha, target_modules=list(p.target_modules), lora_dropout=p.lora_dropout,
        bias=p.bias, use_rslora=p.use_rslora, init_lora_weights=p.init_lora_weights, use_dora=p.use_dora,
        modules_to_save=list(p.modules_to_save) if p.modules_to_save else None, task_type=p.task_type or task_type,
    )  # fmt: skip
    return get_peft_model(model, config)


def argument_differences(contract: Contract, args: Any) -> list[str]:
    """Fields of the live Trainer arguments that change the computation and differ from what the
    contract's recipe builds (:data:`COMPUTATION_FIELDS`, a subclass's own fields, and every
    ``trainer_args`` key): the
    contract's ``trainer_args``, else the arguments class's default. (No reference object is built:
    constructing ``TrainingArguments`` resets accelerate's state mid-run.)"""
    import dataclasses

    from transformers import TrainingArguments
    from transformers.trainer_pt_utils import AcceleratorConfig

    cls = arguments_class(trainer_class(contract))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    extra = [n for n in fields if n not in base and n not in HARMLESS_EXTRA_FIELDS]
    fixed = contract_fields(contract, cls)
    out = [f"trainer_args.{k}: not a field of {cls.__name__}" for k in contract.trainer_args if k not in fields]
    for name in dict.fromkeys((*COMPUTATION_FIELDS, *extra, *contract.trainer_args)):
        if name not in fields:
            continue
        f = fields[name]
        want = fixed.get(name, f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
        if name == "accelerator_config" and (want is None or isinstance(want, dict)):
            want = AcceleratorConfig(**(want or {}))  # what __post_init__ makes of it
        if name in ("fsdp", "fsdp_config") and fixed.get("fsdp"):
            want = _fsdp_as_built(fixed)[name]
        want, have = _plain(want), _plain(getattr(args, name, None))
        if want != have:
            where = "contract" if name in fixed else "default"
            out.append(f"training argument {name}: {where}={want!r}, live={have!r} (it changes the "
                       f"computation: set it in the contract's trainer_args)")  # fmt: skip
    return out


def _fsdp_as_built(fixed: dict[str, Any]) -> dict[str, Any]:
    """``fsdp`` and ``fsdp_config`` as ``TrainingArguments`` normalises the contract's (transformers'
    own normalisation, run on a stand-in: building the arguments would reset accelerate's state)."""
    import types

    from transformers import TrainingArguments

    ns = types.SimpleNamespace(fsdp=fixed["fsdp"], fsdp_config=copy.deepcopy(fixed.get("fsdp_config")),
                               activation_checkpointing=fixed.get("activation_checkpointing", False))  # fmt: skip
    try:
        TrainingArguments._process_fsdp_args(ns)
    except Exception:  # noqa: BLE001 - another transformers: compare the contract's values as written
        return {"fsdp": fixed["fsdp"], "fsdp_config": fixed.get("fsdp_config")}
    return {"fsdp": ns.fsdp, "fsdp_config": ns.fsdp_config}


def _plain(value: Any) -> Any:
    import dataclasses
    from enum import Enum

    if isinstance(value, Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    return value
