"""``aftune contract init`` and ``aftune digest``: a complete contract from a model and a dataset.

:func:`init_contract` fills in what can be read off the files -- the base model and dataset
digests, the dataset's builder and columns, LoRA target modules for the model type -- takes the
rest from the built-in defaults and ``settings`` (dotted keys, ``training.learning_rate=2e-4``),
and validates the result as :func:`~aftune_hf.contract.load_contract` would.

Example:
    >>> data = init_contract("models/my-gpt2", "data/train.jsonl", lora=8,
    ...                      settings={"training.max_steps": 100})            # doctest: +SKIP
    >>> data["peft"]["target_modules"]                                        # doctest: +SKIP
    ['c_attn']
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .artifacts import dataset_digest, model_dir_digest
from .contract import Contract
from .errors import ConfigError

TASKS = {"causal_lm": "aftune_hf.recipes.generic:causal_lm",
         "sequence_classification": "aftune_hf.recipes.generic:sequence_classification"}  # fmt: skip
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
# column names the generic recipes recognise, in order of preference
_GUESSES = (({"messages"}, {"messages_column": "messages"}),
            ({"prompt", "completion"}, {"prompt_column": "prompt", "response_column": "completion"}),
            ({"instruction", "response"}, {"prompt_column": "instruction", "response_column": "response"}),
            ({"question", "answer"}, {"prompt_column": "question", "response_column": "answer"}),
            ({"text"}, {"text_column": "text"}), ({"sentence"}, {"text_column": "sentence"}))  # fmt: skip


def digest_path(path: str | Path) -> str:
    """``aftune digest``: a model directory's, a recipe module's (``.py`` or ``module:function``) or
    a dataset file's / folder's digest, as the contract binds it (hex)."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        return model_dir_digest(p).hex()
    if p.suffix == ".py" and p.is_file():
        from . import digest as D

        return D.file_digest(p).hex()
    if not p.exists() and ":" in str(path):
        from .contract import recipe_source_digest

        return recipe_source_digest(_stub(recipe=str(path)))
    return dataset_digest(p).hex()


def init_contract(
    model: str | Path, dataset: str | Path, *, task: str = "causal_lm", lora: int | None = None,
    trainer: str = "transformers:Trainer", recipe: str | None = None, settings: Mapping[str, Any] | None = None,
    relative_to: str | Path | None = None, name: str = "",
) -> dict[str, Any]:
    """A complete contract (plain mapping, YAML-able) for fine-tuning ``model`` on ``dataset``."""
    if task not in TASKS:
        raise ConfigError("invalid_value", f"task {task!r}, expected one of {sorted(TASKS)}")
    model, dataset = Path(model), Path(dataset)
    config = _model_config(model)
    builder = _builder(dataset)
    data: dict[str, Any] = {"builder": builder, **_columns(dataset, builder, task)}
    if task == "sequence_classification":
        data.setdefault("num_labels", int(config.get("num_labels", 2)))
    out: dict[str, Any] = {
        "aftune_contract": 1,
        "name": name or model.name,
        "recipe": recipe or TASKS[task],
        "trainer": trainer,
        "base_model": {"path": _rel(model, relative_to), "digest": model_dir_digest(model).hex()},
        "dataset": {"path": _rel(dataset, relative_to), "digest": dataset_digest(dataset).hex()},
        "data": data,
        "training": {"learning_rate": 2e-4 if lora else 2e-5, "max_steps": 100, "per_device_train_batch_size": 8,
                     "gradient_accumulation_steps": 1, "lr_scheduler_type": "linear", "warmup_steps": 0, "seed": 42,
                     "data_seed": 42, "optim": "adamw_torch", "weight_decay": 0.0, "max_grad_norm": 1.0,
                     "precision": "fp32", "attn_implementation": "sdpa",
                     "padding": {"side": "right", "max_length": 512, "pad_to_multiple_of": 8}},
        "audit": {"anchor_every": 10, "checkpoint_every": 1, "mode": "exact", "tolerance": 0.0, "windows": 4,
                  "min_detection": 0.9, "detect_fraction": 0.1},
    }  # fmt: skip
    if lora:
        out["peft"] = {"r": lora, "lora_alpha": 2 * lora, "lora_dropout": 0.0,
                       "target_modules": _target_modules(config.get("model_type"))}  # fmt: skip
        if task == "sequence_classification":
            out["peft"]["task_type"] = "SEQ_CLS"  # peft then trains the new head fully (modules_to_save)
    for key, value in (settings or {}).items():
        _set(out, key, value)
    _size_audit(out, settings or {})
    if recipe is not None and "recipe_digest" not in (settings or {}):
        from .contract import recipe_source_digest

        out["recipe_digest"] = recipe_source_digest(_stub(recipe=recipe))
    Contract.from_dict(out)  # complete and valid, or ConfigError naming the field
    return out


def write_contract(data: Mapping[str, Any], path: str | Path, *, force: bool = False) -> Path:
    """Write ``data`` as YAML (not over an existing file unless ``force``), atomically."""
    from .safeio import atomic_write_bytes

    p = Path(path)
    if p.exists() and not force:
        raise ConfigError("file_exists", "refusing to overwrite (use --force)", path=str(p))
    text = "# Written by `aftune contract init`; every field is in docs/CONTRACT.md.\n" + yaml.safe_dump(dict(data), sort_keys=False)
    atomic_write_bytes(p, text.encode("utf-8"))
    return p


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """``["training.max_steps=50", ...]`` -> ``{"training.max_steps": 50}`` (values read as YAML)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError("invalid_value", f"--set {pair!r}: expected KEY=VALUE, e.g. training.max_steps=50")
        out[key.strip()] = yaml.safe_load(value)
    return out


# --- helpers --------------------------------------------------------------------------------------


def _size_audit(out: dict[str, Any], settings: Mapping[str, Any]) -> None:
    """About 50 windows (anchors every ~50th of the run) and enough of them challenged for
    ``audit.min_detection`` (unless set; about 40 % of the run is re-executed):
    with fewer, an honest verification would be INCONCLUSIVE."""
    from .report import plan

    audit, steps = out["audit"], out["training"].get("max_steps")
    if not isinstance(steps, int) or steps < 1:
        return
    if "audit.anchor_every" not in settings:
        audit["anchor_every"] = max(1, steps // 50)
    if "audit.windows" not in settings:
        need = plan(steps, audit["anchor_every"], float(audit.get("detect_fraction", 0.1)),
                    min(float(audit.get("min_detection", 0.9)), 0.999999))  # fmt: skip
        audit["windows"] = need["windows"]


def _stub(**kw: Any) -> Contract:
    zero = {"path": ".", "digest": "0" * 64}
    return Contract.from_dict({"recipe": TASKS["causal_lm"], "base_model": zero, "dataset": zero,
                               "training": {"learning_rate": 1e-4, "max_steps": 1, "per_device_train_batch_size": 1}, **kw})  # fmt: skip


def _model_config(model: Path) -> dict[str, Any]:
    try:
        return json.loads((model / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError("model_not_found", f"no readable config.json: {e}", path=str(model)) from None


def _builder(dataset: Path) -> str:
    files = [dataset] if dataset.is_file() else sorted(p for p in dataset.rglob("*") if p.is_file())
    kinds = {_BUILDERS.get(p.suffix.lower()) for p in files} - {None}
    if len(kinds) != 1:
        raise ConfigError("dataset_invalid", "cannot tell the dataset format from the file names; pass "
                          "--set data.builder=json|csv|parquet|text", path=str(dataset))  # fmt: skip
    return kinds.pop()


def _columns(dataset: Path, builder: str, task: str) -> dict[str, Any]:
    import tempfile

    from .recipes.generic import load_rows

    with tempfile.TemporaryDirectory(prefix="aftune-init-") as tmp:
        stub = _stub(dataset={"path": str(dataset.resolve()), "digest": "0" * 64}, data={"builder": builder})
        columns = set(load_rows(stub, tmp).column_names)
    if task == "sequence_classification":
        text = next((c for c in ("text", "sentence", "content") if c in columns), None)
        return {k: v for k, v in {"text_column": text, "label_column": "label"}.items() if v is not None}
    for need, spec in _GUESSES:
        if need <= columns:
            return dict(spec)
    return {}  # the user names the columns with --set data.text_column=...


def _target_modules(model_type: Any) -> list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as TARGETS

    found = TARGETS.get(model_type)
    if not found:
        raise ConfigError("invalid_value", f"no default LoRA target modules for model type {model_type!r}; pass "
                          "--set peft.target_modules=[...]")  # fmt: skip
    return list(found)


def _rel(path: Path, base: str | Path | None) -> str:
    if base is None:
        return str(path)
    try:
        return os.path.relpath(path.resolve(), Path(base).resolve())
    except ValueError:  # another drive
        return str(path.resolve())


def _set(out: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = out
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError("invalid_value", f"--set {dotted}: {part} is not a section")
    node[leaf] = value
