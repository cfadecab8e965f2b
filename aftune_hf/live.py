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

from . import digest as D
from .artifacts import architecture_config, dataset_digest
from .contract import Contract
from .statecodec import encode_optimizer, encode_rng, optimizer_param_names, to_json_value
from .trace import Anchor

# TrainerState fields an anchor keeps: the counters a resumed Trainer computes with or that follow
# from the steps trained. The rest (log_history, total_flos, best_*, ...) is logging, not state.
TRAINER_FIELDS = ("global_step", "epoch", "max_steps", "num_train_epochs", "train_batch_size", "num_input_tokens_seen")


def unwrap(model: Any) -> Any:
    """The module under DDP/DataParallel wrappers."""
    while hasattr(model, "module") and isinstance(model, torch.nn.Module) and not hasattr(model, "peft_config"):
        model = model.module
    return model


def trainable_params(model: Any) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (live references, not copies)."""
    return {n: p for n, p in unwrap(model).named_parameters() if p.requires_grad}


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


def make_anchor(
    step: int, model: Any, optimizer: Any, lr_scheduler: Any, trainer_state: Any, *, copy: bool = True
) -> Anchor:
    """Capture full resumable state at ``step`` as an :class:`Anchor`.

    With ``copy=False`` the params and optimizer tensors are the *live* tensors (no copy): the
    caller must finish reading them before the next ``optimizer.step()``.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    opt_tensors, opt_meta = encode_optimizer(inner.state_dict(), optimizer_param_names(inner, unwrap(model)))
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
    """The base model's tensors under their checkpoint names (LoRA layers removed)."""
    m = unwrap(model)
    if hasattr(m, "get_base_model"):
        sd = m.get_base_model().state_dict()
        return {k.replace(".base_layer.", "."): v for k, v in sd.items() if "lora_" not in k}
    return m.state_dict()


def live_base_digest(model: Any, base_dir: Path) -> bytes:
    """Model digest of the *live* base weights (names from the base model's safetensors files)."""
    from safetensors import safe_open

    live = base_state(model)
    names: list[str] = []
    for f in sorted(base_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            names.extend(fh.keys())
    missing = [n for n in names if n not in live]
    if missing:
        return b"missing:" + ",".join(missing[:3]).encode()
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    return D.model_digest(D.state_digest({n: live[n] for n in names}), architecture_config(config))


def _norm(v: Any) -> Any:
    return v.value if isinstance(v, Enum) else v


def contract_differences(
    contract: Contract, args: Any, model: Any, train_dataloader: Any = None, *, check_base: bool = True
) -> list[str]:
    """Every way the live run differs from ``contract``, as ``"field: contract=X, live=Y"`` lines."""
    diffs: list[str] = []

    def cmp(name: str, want: Any, have: Any) -> None:
        if want != have:
            diffs.append(f"{name}: contract={want!r}, live={have!r}")

    for key, want in contract.training_arguments_kwargs().items():
        have = _norm(getattr(args, key, None))
        if isinstance(want, float) and isinstance(have, (int, float)):
            have = float(have)
        cmp(f"training.{key}", want, have)
    cmp("training.world_size", contract.training.world_size, int(getattr(args, "world_size", 1)))
    m = unwrap(model)
    cfg = (m.get_base_model() if hasattr(m, "get_base_model") else m).config
    cmp("training.attn_implementation", contract.training.attn_implementation, getattr(cfg, "_attn_implementation", None))
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
        extra = sorted(n for n in trainable if "lora_" not in n)
        if extra:
            diffs.append(f"trainable parameters: contract=LoRA only, live also trains {extra[:3]}")
    if check_base:
        base_dir = contract.resolve(contract.base_model.path)
        have = live_base_digest(m, base_dir)
        cmp("base_model.digest", contract.base_model.digest, have.hex() if len(have) == 32 else have.decode())
    data_path = contract.resolve(contract.dataset.path)
    if data_path.exists():
        cmp("dataset.digest", contract.dataset.digest, dataset_digest(data_path).hex())
    else:
        diffs.append(f"dataset.path: {data_path} does not exist")
    return diffs
