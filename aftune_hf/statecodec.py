"""Re-encode resumable training state (optimizer, scheduler, RNG) as tensors + JSON.

A stock Trainer checkpoint pickles these (``optimizer.pt``, ``scheduler.pt``,
``rng_state.pth``); a trace must never contain pickle. These pure functions turn each
state into ``(tensors, json_value)`` and back, losslessly: floats are stored exactly
(:func:`aftune_hf.digest.encode_float`), tuples stay tuples, tensors go to safetensors.

Example:
    >>> import torch
    >>> p = torch.nn.Parameter(torch.ones(2))
    >>> opt = torch.optim.AdamW([p], lr=1e-3)
    >>> p.sum().backward(); opt.step()
    >>> tensors, meta = encode_optimizer(opt.state_dict(), ["w"])
    >>> sorted(tensors)
    ['state/w/exp_avg', 'state/w/exp_avg_sq', 'state/w/step']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .digest import decode_float, encode_float
from .errors import RecorderError, TraceFormatError

_MAX_DEPTH = 32


def to_json_value(value: Any, *, _depth: int = 0) -> Any:
    """Encode a Python value into canonical-JSON-safe form, exactly and unambiguously.

    ``None``/``bool``/``int``/``str`` stay as they are; ``float`` -> ``{"float": hex}``;
    ``tuple`` -> ``{"tuple": [...]}``; ``list`` -> ``[...]``; ``dict`` with str keys ->
    ``{"dict": {...}}``. Anything else (tensors, callables) raises :class:`RecorderError`.
    """
    if _depth > _MAX_DEPTH:
        raise RecorderError("state_unencodable", "nesting too deep")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return {"float": encode_float(value)}
    if isinstance(value, tuple):
        return {"tuple": [to_json_value(v, _depth=_depth + 1) for v in value]}
    if isinstance(value, list):
        return [to_json_value(v, _depth=_depth + 1) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise RecorderError("state_unencodable", "dict keys must be str")
        return {"dict": {k: to_json_value(v, _depth=_depth + 1) for k, v in value.items()}}
    if hasattr(value, "item") and getattr(value, "numel", lambda: 2)() == 1:
        raise RecorderError("state_unencodable", "tensor values belong in the tensor part")
    raise RecorderError("state_unencodable", f"cannot encode {type(value).__name__}")


def from_json_value(value: Any, *, path: str = "", _depth: int = 0) -> Any:
    """Inverse of :func:`to_json_value`; raises :class:`TraceFormatError` on malformed input."""
    if _depth > _MAX_DEPTH:
        raise TraceFormatError("state_invalid", "nesting too deep", path=path)
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, list):
        return [from_json_value(v, path=path, _depth=_depth + 1) for v in value]
    if isinstance(value, dict) and len(value) == 1:
        ((tag, inner),) = value.items()
        if tag == "float" and isinstance(inner, str):
            try:
                return decode_float(inner)
            except ValueError:
                raise TraceFormatError("state_invalid", f"bad float {inner!r}", path=path) from None
        if tag == "tuple" and isinstance(inner, list):
            return tuple(from_json_value(v, path=path, _depth=_depth + 1) for v in inner)
        if tag == "dict" and isinstance(inner, dict):
            return {k: from_json_value(v, path=path, _depth=_depth + 1) for k, v in inner.items()}
    raise TraceFormatError("state_invalid", f"unexpected value {str(value)[:80]}", path=path)


# --- optimizer -----------------------------------------------------------------------------------


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def encode_optimizer(
    state_dict: Mapping[str, Any], param_names: Sequence[str]
) -> tuple[dict[str, Any], Any]:
    """Encode ``optimizer.state_dict()`` with integer parameter ids replaced by names.

    ``param_names[i]`` names the parameter with id ``i`` (the order of
    ``optimizer.param_groups``' params). Tensor state goes to ``state/<name>/<key>``;
    non-tensor state and the param groups go to the JSON part.
    """
    import torch

    tensors: dict[str, Any] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state_dict["state"].items():
        name = param_names[idx]
        for key, v in per_param.items():
            if isinstance(v, torch.Tensor):  # an FSDP2 shard (DTensor) stays where it is: each rank writes its own
                tensors[f"state/{name}/{key}"] = v.detach() if _is_dtensor(v) else v.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[key] = v
    groups = []
    for group in state_dict["param_groups"]:
        g = {k: v for k, v in group.items() if k != "params"}
        if any(isinstance(v, torch.Tensor) for v in g.values()):
            raise RecorderError("state_unencodable", "tensor-valued param group options")
        groups.append({"options": to_json_value(g), "params": [param_names[i] for i in group["params"]]})
    return tensors, {"param_groups": groups, "scalars": to_json_value(scalars)}


def decode_optimizer(tensors: Mapping[str, Any], meta: Any, *, path: str = "") -> dict[str, Any]:
    """Rebuild a ``state_dict`` that ``optimizer.load_state_dict`` accepts (ids by group order)."""
    if not isinstance(meta, dict) or set(meta) != {"param_groups", "scalars"}:
        raise TraceFormatError("state_invalid", "optimizer meta keys", path=path)
    names: list[str] = []
    groups = []
    for g in meta["param_groups"] if isinstance(meta["param_groups"], list) else []:
        if not isinstance(g, dict) or set(g) != {"options", "params"}:
            raise TraceFormatError("state_invalid", "optimizer group keys", path=path)
        options = from_json_value(g["options"], path=path)
        params = g["params"]
        if not isinstance(options, dict) or not isinstance(params, list):
            raise TraceFormatError("state_invalid", "optimizer group", path=path)
        ids = []
        for n in params:
            if not isinstance(n, str) or n in names:
                raise TraceFormatError("state_invalid", f"parameter {n!r} repeated", path=path)
            ids.append(len(names))
            names.append(n)
        groups.append({**options, "params": ids})
    scalars = from_json_value(meta["scalars"], path=path)
    if not isinstance(scalars, dict):
        raise TraceFormatError("state_invalid", "optimizer scalars", path=path)
    state: dict[int, dict[str, Any]] = {}
    index = {n: i for i, n in enumerate(names)}
    for key, t in tensors.items():
        parts = key.split("/")
        if len(parts) < 3 or parts[0] != "state" or "/".join(parts[1:-1]) not in index:
            raise TraceFormatError("state_invalid", f"unexpected optimizer tensor {key}", path=path)
        state.setdefault(index["/".join(parts[1:-1])], {})[parts[-1]] = t
    for n, values in scalars.items():
        if n not in index or not isinstance(values, dict):
            raise TraceFormatError("state_invalid", f"unexpected optimizer scalar {n}", path=path)
        state.setdefault(index[n], {}).update(values)
    return {"state": state, "param_groups": groups}


def optimizer_param_names(optimizer: Any, model: Any) -> list[str]:
    """Names of the optimizer's parameters in ``state_dict`` id order."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in by_id:
                raise RecorderError("unknown_parameter", "optimizer holds a parameter the model lacks")
            names.append(by_id[id(p)])
    return names


# --- RNG -------------------------------------------------------------------------------------------


def encode_rng(states: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """Encode a Trainer-style RNG dict (``python``, ``numpy``, ``cpu``, ``cuda``...) losslessly."""
    import numpy as np
    import torch

    tensors: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    for key, value in states.items():
        if key == "python":
            version, internal, gauss = value
            meta["python"] = {"version": version, "state": list(internal), "gauss": to_json_value(gauss)}
        elif key == "numpy":
            kind, keys, pos, has_gauss, cached = value
            meta["numpy"] = {
                "kind": str(kind),
                "keys": [int(x) for x in np.asarray(keys, dtype=np.uint32)],
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": to_json_value(float(cached)),
            }
        elif isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().contiguous()
        elif isinstance(value, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in value):
            for i, v in enumerate(value):
                tensors[f"{key}.{i}"] = v.detach().cpu().contiguous()
            meta.setdefault("lists", {})[key] = len(value)
        else:
            raise RecorderError("state_unencodable", f"RNG state {key!r} of {type(value).__name__}")
    return tensors, meta


def decode_rng(tensors: Mapping[str, Any], meta: Any, *, path: str = "") -> dict[str, Any]:
    """Inverse of :func:`encode_rng`: the dict ``Trainer._load_rng_state`` expects."""
    import numpy as np

    if not isinstance(meta, dict) or not set(meta) <= {"python", "numpy", "lists"}:
        raise TraceFormatError("state_invalid", "rng meta keys", path=path)
    out: dict[str, Any] = {}
    try:
        if "python" in meta:
            p = meta["python"]
            state = p["state"]
            if len(state) != 625 or not all(type(x) is int and 0 <= x < 2**32 for x in state):
                raise ValueError("python state")
            if type(p["version"]) is not int or set(p) != {"version", "state", "gauss"}:
                raise ValueError("python version")
            out["python"] = (p["version"], tuple(state), from_json_value(p["gauss"], path=path))
        if "numpy" in meta:
            n = meta["numpy"]
            keys = n["keys"]
            if len(keys) != 624 or not all(type(x) is int and 0 <= x < 2**32 for x in keys):
                raise ValueError("numpy keys")
            cached = from_json_value(n["cached_gaussian"], path=path)
            if (set(n) != {"kind", "keys", "pos", "has_gauss", "cached_gaussian"} or type(n["kind"]) is not str
                    or type(n["pos"]) is not int or type(n["has_gauss"]) is not int or type(cached) is not float):  # fmt: skip
                raise ValueError("numpy state")  # exact types: the state is compared, never normalised
            out["numpy"] = (n["kind"], np.asarray(keys, dtype=np.uint32), n["pos"], n["has_gauss"], cached)
    except (KeyError, TypeError, ValueError) as e:
        raise TraceFormatError("state_invalid", f"rng: {e}", path=path) from None
    lists = meta.get("lists", {})
    if not isinstance(lists, dict):
        raise TraceFormatError("state_invalid", "rng lists", path=path)
    list_keys = {f"{k}.{i}" for k, n in lists.items() if type(n) is int and 0 <= n <= 64 for i in range(n)}
    for k, n in lists.items():
        if type(n) is not int or not 0 <= n <= 64 or any(f"{k}.{i}" not in tensors for i in range(n)):
            raise TraceFormatError("state_invalid", f"rng list {k!r}", path=path)
        out[k] = [tensors[f"{k}.{i}"] for i in range(n)]
    for key, t in tensors.items():
        if key not in list_keys:
            out[key] = t
    return out
