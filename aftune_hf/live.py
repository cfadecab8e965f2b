"""Read the state of a live Trainer run: trainable tensors, RNG, anchors, and contract checks.

Shared by the recorder (:mod:`aftune_hf.callback`) and the replayer; no file I/O here.

Example:
    >>> diffs = contract_differences(contract, args, model, train_dataloader)   # doctest: +SKIP
    >>> diffs   # [] when the live run is the agreed job
    []
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .artifacts import dataset_digest
from .contract import Contract
from .statecodec import encode_optimizer, encode_rng, optimizer_param_names, to_json_value
from .trace import Anchor

# TrainerState fields an anchor keeps: the counters a resumed Trainer computes with or that follow
# from the steps trained. The rest (log_history, total_flos, best_*, num_input_tokens_seen -- counted
# only when the provider's logging asks for it --, ...) is logging, not state.
TRAINER_FIELDS = ("global_step", "epoch", "max_steps", "num_train_epochs", "train_batch_size")


def unwrap(model: Any) -> Any:
    """The module under DDP/DataParallel wrappers."""
    while hasattr(model, "module") and isinstance(model, torch.nn.Module) and not hasattr(model, "peft_config"):
        model = model.module
    return model


def trainable_params(model: Any) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (live references, not copies)."""
    return {n: p for n, p in unwrap(model).named_parameters() if p.requires_grad}


def sharded_parameters(model: Any) -> list[str]:
    """Trainable parameters that are shards of a larger tensor: FSDP2 ``DTensor``, FSDP1 flat
    parameters, DeepSpeed ZeRO-3 partitions (the recorder refuses them: docs/SCALING.md)."""
    from torch.distributed.tensor import DTensor

    return [n for n, p in unwrap(model).named_parameters()
            if p.requires_grad and (isinstance(p, DTensor) or hasattr(p, "ds_id") or type(p).__name__ == "FlatParameter")]  # fmt: skip


def snapshot(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies (safe to hand to another thread)."""
    return {n: t.detach().to("cpu", copy=True) for n, t in tensors.items()}


def on_host(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """CPU tensors as they are (read in place); tensors on a GPU copied to the CPU, once. Returns
    the tensors and whether anything was copied (after which the live tensors may change).

    Plain (pageable) host memory: pinned buffers would be cached by torch for the whole run,
    locking as much RAM as the optimizer state.
    """
    out = {n: t.detach() if t.device.type == "cpu" else t.detach().to("cpu") for n, t in tensors.items()}
    return out, any(t.device.type != "cpu" for t in tensors.values())


def rng_states() -> dict[str, Any]:
    """Every RNG state the Trainer saves in ``rng_state.pth``."""
    states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_states` returned."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["cpu"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


def encoded_optimizer(model: Any, optimizer: Any) -> tuple[dict[str, Any], Any]:
    """The optimizer's state as named tensors (live references) and JSON meta (:func:`encode_optimizer`)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    return encode_optimizer(inner.state_dict(), optimizer_param_names(inner, unwrap(model)))


def make_anchor(
    step: int, model: Any, optimizer: Any, lr_scheduler: Any, trainer_state: Any, *, copy: bool = True
) -> Anchor:
    """Capture full resumable state at ``step`` as an :class:`Anchor`.

    With ``copy=False`` the params and optimizer tensors are the *live* tensors (no copy): the
    caller must finish reading them before the next ``optimizer.step()``.
    """
    opt_tensors, opt_meta = encoded_optimizer(model, optimizer)
    rng_tensors, rng_meta = encode_rng(rng_states())
    state_json = None
    if trainer_state is not None:  # only what a resumed Trainer computes with (the rest is logging)
        full = json.loads(json.dumps(dataclasses.asdict(trainer_state)))
        state_json = {k: full.get(k) for k in TRAINER_FIELDS}
    meta = {
        "step": step,
        "optimizer": opt_meta,
        "scheduler": to_json_value(lr_scheduler.state_dict()) if lr_scheduler is not None else None,
        "rng": rng_meta,
        "trainer_state": to_json_value(state_json),
    }
    keep = snapshot if copy else dict
    return Anchor(step, keep(trainable_params(model)), keep(opt_tensors), snapshot(rng_tensors), meta)


# --- contract checks ---------------------------------------------------------------------------


def base_state(model: Any) -> dict[str, torch.Tensor]:
    """The base model's tensors under their checkpoint names (adapter layers and PEFT's trained
    copies of ``modules_to_save`` removed; their original modules kept)."""
    m = unwrap(model)
    if not hasattr(m, "get_base_model"):
        return m.state_dict()
    out = {}
    for k, v in m.get_base_model().state_dict().items():
        if "lora_" in k or ".modules_to_save." in k:
            continue
        out[k.replace(".base_layer.", ".").replace(".original_module.", ".")] = v
    return out


def base_differences(model: Any, base_dir: Path) -> tuple[bytes, list[str]]:
    """The base model directory's digest, and the base tensors the live model holds with other
    values than its files -- one pass over the files. Tensors of the files the model does not use
    (an MLM head under a new classifier) and new tensors are fine; a model sharing no tensor with
    the files is not built from them."""
    from .artifacts import model_dir_digest

    live = base_state(model)
    prefix = getattr(unwrap(model), "base_model_prefix", "") or ""
    shared, differ = [], []

    def compare(name: str, want: torch.Tensor) -> None:
        have = live.get(name, live.get(f"{prefix}.{name}") if prefix else None)
        if have is None:
            return
        shared.append(name)
        if have.shape != want.shape or not torch.equal(have.detach().to("cpu", want.dtype), want):
            differ.append(name)

    digest = model_dir_digest(base_dir, visit=compare)
    if not shared:
        return digest, ["base_model.digest: the live model holds none of the base model's tensors"]
    if differ:
        return digest, [f"base_model.digest: {len(differ)} live tensors differ from the base model's files (e.g. {differ[0]})"]
    return digest, []


def running_trainer() -> Any:
    """The ``transformers.Trainer`` whose ``train()`` is on the call stack (None if not found)."""
    import sys

    import transformers

    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, transformers.Trainer):
            return candidate
        frame = frame.f_back
    return None


# packages whose Trainer subclasses compute differently from their base (trl.SFTTrainer): named exactly
TRAINER_LIBRARIES = frozenset({"transformers", "trl", "peft", "accelerate", "sentence_transformers", "setfit", "unsloth"})


def trainer_differences(contract: Contract, live: type) -> list[str]:
    """The verifier replays with the contract's Trainer class: another library's class is another
    computation (refused); a user's own subclass of it is accepted with a warning."""
    import logging

    from .recipes.common import trainer_class

    want = trainer_class(contract)
    if live is want:
        return []
    name = f"{live.__module__}:{live.__qualname__}"
    if issubclass(live, want) and live.__module__.split(".")[0] not in TRAINER_LIBRARIES:
        logging.getLogger(__name__).warning("aftune: training with %s; the verifier replays with the contract's %s, "
                                            "so the subclass must not change the computation", name, contract.trainer)
        return []
    return [f"trainer: contract={contract.trainer!r}, live={name!r} (the contract's trainer field names the class "
            "you train with)"]


def _norm(v: Any) -> Any:
    return v.value if isinstance(v, Enum) else v


def contract_differences(
    contract: Contract, args: Any, model: Any, train_dataloader: Any = None, *, check_base: bool = True,
    trainer: Any = None,
) -> list[str]:
    """Every way the live run differs from ``contract``, as ``"field: contract=X, live=Y"`` lines."""
    diffs: list[str] = []

    def cmp(name: str, want: Any, have: Any) -> None:
        if want != have:
            diffs.append(f"{name}: contract={want!r}, live={have!r}")

    if trainer is not None:
        diffs += trainer_differences(contract, type(trainer))
    from .recipes.common import argument_differences

    diffs += argument_differences(contract, args)
    if contract.recipe_digest is not None:
        from .contract import recipe_source_digest

        cmp("recipe_digest", contract.recipe_digest, recipe_source_digest(contract))
    for key, want in contract.training_arguments_kwargs().items():
        have = _norm(getattr(args, key, None))
        if isinstance(want, float) and isinstance(have, (int, float)):
            have = float(have)
        cmp(f"training.{key}", want, have)
    cmp("training.world_size", contract.training.world_size, int(getattr(args, "world_size", 1)))
    m = unwrap(model)
    cfg = (m.get_base_model() if hasattr(m, "get_base_model") else m).config
    cmp("training.attn_implementation", contract.training.attn_implementation, getattr(cfg, "_attn_implementation", None))
    if train_dataloader is not None and _norm(getattr(args, "train_sampling_strategy", None)) == "group_by_length":
        n, ga = len(train_dataloader), contract.training.gradient_accumulation_steps
        if contract.training.max_steps > max(n // ga + int(n % ga > 0), 1):  # its sampler draws from the global RNG
            diffs.append("train_sampling_strategy: group_by_length over more than one epoch draws each later epoch's "
                         "batch order from the training RNG, which no data check can re-derive; train one epoch "
                         "or sample at random")  # fmt: skip
    if train_dataloader is not None:
        collator = getattr(train_dataloader, "collate_fn", None)
        collator = getattr(collator, "data_collator", collator)
        p = contract.training.padding
        if hasattr(collator, "pad_to_multiple_of"):
            cmp("training.padding.pad_to_multiple_of", p.pad_to_multiple_of, collator.pad_to_multiple_of)
        side = getattr(getattr(collator, "tokenizer", None), "padding_side", None)
        if side is not None:
            cmp("training.padding.side", p.side, side)

    trainable = trainable_params(m)
    if contract.peft is None:
        frozen = sorted(n for n, p in m.named_parameters() if not p.requires_grad)
        if hasattr(m, "peft_config"):
            diffs.append("peft: contract=None (full fine-tune), live=a PEFT model")
        elif frozen:
            diffs.append(f"trainable parameters: contract=all, live has {len(frozen)} frozen (e.g. {frozen[0]})")
    else:
        live_cfg = getattr(m, "peft_config", {}).get("default")
        if live_cfg is None:
            diffs.append("peft: contract=LoRA, live=no PEFT adapter")
        else:
            p = contract.peft
            cmp("peft.r", p.r, live_cfg.r)
            cmp("peft.lora_alpha", p.lora_alpha, live_cfg.lora_alpha)
            cmp("peft.lora_dropout", p.lora_dropout, float(live_cfg.lora_dropout))
            cmp("peft.target_modules", sorted(p.target_modules), sorted(live_cfg.target_modules or []))
            cmp("peft.bias", p.bias, live_cfg.bias)
            cmp("peft.use_rslora", p.use_rslora, bool(live_cfg.use_rslora))
            cmp("peft.use_dora", p.use_dora, bool(getattr(live_cfg, "use_dora", False)))
            if p.modules_to_save is not None:  # peft adds a classification task's head names itself
                auto = {"classifier", "score"} if _norm(live_cfg.task_type) == "SEQ_CLS" else set()
                cmp("peft.modules_to_save", sorted(set(p.modules_to_save) | auto), sorted(set(live_cfg.modules_to_save or []) | auto))
            if p.task_type is not None:
                cmp("peft.task_type", p.task_type, _norm(live_cfg.task_type))
        extra = sorted(n for n in trainable if "lora_" not in n and ".modules_to_save." not in n)
        if extra:
            diffs.append(f"trainable parameters: contract=LoRA only, live also trains {extra[:3]}")
    if check_base:
        digest, differ = base_differences(m, contract.resolve(contract.base_model.path))
        cmp("base_model.digest", contract.base_model.digest, digest.hex())
        diffs += differ
    data_path = contract.resolve(contract.dataset.path)
    if data_path.exists():
        cmp("dataset.digest", contract.dataset.digest, dataset_digest(data_path).hex())
    else:
        diffs.append(f"dataset.path: {data_path} does not exist")
    return diffs
