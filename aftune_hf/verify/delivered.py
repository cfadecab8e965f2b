"""The model a client received, checked whole against what the trace and the contract imply.

Tensors: exactly the trace's final trainable state (PEFT's saved names accepted), nothing
missing, nothing extra -- except tensors the training never touches (persistent buffers), which
must equal the client's base model. Config files that change the computation
(``adapter_config.json``, ``config.json``, ``generation_config.json``) must equal the ones the
client's own recipe model saves, field by field, ignoring only :data:`IGNORED_FIELDS`
(training-only and provenance fields).

Example:
    >>> check_delivered("delivered-adapter/", schema, final_state, recipe_model, base_dir)   # doctest: +SKIP
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import digest as D
from ..artifacts import TRAINING_ONLY_CONFIG_KEYS
from ..errors import ManifestMismatchError
from ..safeio import loads_json_strict, parse_safetensors, read_regular_file

CONFIG_FILES = ("adapter_config.json", "config.json", "generation_config.json")
IGNORED_FIELDS = frozenset(TRAINING_ONLY_CONFIG_KEYS | {"transformers_version", "_name_or_path", "base_model_name_or_path", "revision",
                                       "inference_mode", "peft_version"})  # fmt: skip
_MAX_CONFIG = 4 << 20


def delivered_state(path: str | Path) -> dict[str, Any]:
    """Tensors of a delivered model or adapter directory (or one .safetensors file), strictly parsed."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(p.glob("*.safetensors"))
    if not files:
        raise ManifestMismatchError("model_missing", "no .safetensors in the delivered model", path=str(p))
    out: dict[str, Any] = {}
    for f in files:
        blob = read_regular_file(f.parent, f.name, max_bytes=1 << 40)
        for name, t in parse_safetensors(blob, path=f.name).items():
            if name in out:
                raise ManifestMismatchError("model_mismatch", f"tensor {name} in two files", path=str(p))
            out[name] = t
    return out


def check_delivered(
    path: str | Path, schema: Mapping[str, Any], final_state: str, model: Any = None, base_dir: Path | None = None
) -> None:
    """Raise :class:`ManifestMismatchError` unless ``path`` is the trace's final state, whole.

    ``model``: the client's recipe model (its ``save_pretrained`` gives the reference config files);
    ``base_dir``: the client's base model (for tensors training never changes).
    """
    tensors = delivered_state(path)
    # PEFT saves adapters without the adapter name, and a modules_to_save copy under the module's own name
    by_plain = {n.replace(".modules_to_save.default.", ".").replace(".default.", "."): n for n in schema}
    mapped = {by_plain.get(n, n): t for n, t in tensors.items()}
    if missing := sorted(set(schema) - set(mapped)):
        raise ManifestMismatchError("model_mismatch", f"the delivered model lacks {missing[:3]}", path=str(path))
    if extra := sorted(set(mapped) - set(schema)):
        _check_untouched({n: mapped[n] for n in extra}, base_dir, path)
    if D.state_digest({n: mapped[n] for n in schema}).hex() != final_state:
        raise ManifestMismatchError("model_mismatch", "the delivered model is not the trace's final state", path=str(path))
    if model is not None and Path(path).is_dir():
        _check_configs(Path(path), model, base_dir)


def _check_untouched(extra: Mapping[str, Any], base_dir: Path | None, path: Any) -> None:
    base = delivered_state(base_dir) if base_dir is not None else {}
    for name, t in sorted(extra.items()):
        if name not in base or D.tensor_digest(base[name]) != D.tensor_digest(t):
            raise ManifestMismatchError("model_mismatch", f"extra tensor {name} is neither trained nor the base model's",
                                        path=str(path))  # fmt: skip


def _check_configs(delivered: Path, model: Any, base_dir: Path | None) -> None:
    with tempfile.TemporaryDirectory(prefix="aftune-reference-") as tmp:
        model.save_pretrained(tmp)
        reference = {n: _read(Path(tmp), n) for n in CONFIG_FILES}
    if reference["generation_config.json"] is None and base_dir is not None:
        reference["generation_config.json"] = _read(base_dir, "generation_config.json")
    for name in CONFIG_FILES:
        want, have = reference[name], _read(delivered, name)
        if have is None:
            if want is not None and name != "generation_config.json":  # generation defaults follow from config.json
                raise ManifestMismatchError("model_config", f"{name} is missing", path=str(delivered / name))
            continue
        if want is None:
            raise ManifestMismatchError("model_config", f"{name} is not part of this job's model", path=str(delivered / name))
        diffs = sorted(k for k in set(want) | set(have) - IGNORED_FIELDS
                       if k not in IGNORED_FIELDS and D.exact_floats(want.get(k)) != D.exact_floats(have.get(k)))  # fmt: skip
        if diffs:
            shown = ", ".join(f"{k}={have.get(k)!r} (expected {want.get(k)!r})" for k in diffs[:4])
            raise ManifestMismatchError("model_config", f"{name} differs: {shown}", path=str(delivered / name))


def _read(directory: Path, name: str) -> dict[str, Any] | None:
    if not (directory / name).exists():
        return None
    value = loads_json_strict(read_regular_file(directory, name, max_bytes=_MAX_CONFIG), path=name)
    if not isinstance(value, dict):
        raise ManifestMismatchError("model_config", "not a JSON object", path=str(directory / name))
    return value
