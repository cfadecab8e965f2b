"""What the client's contract and recipe imply for the state a trace records; measurements, no policy.

An anchor holds two kinds of state. *Derivable* state -- the optimizer's options (lr, betas,
eps, weight decay, ``maximize``...), the scheduler's state, the lr applied at every step, the
trainer's counters -- follows from the contract and the recipe alone: :func:`derive_expected`
builds the recipe's own optimizer and scheduler once and steps the scheduler through the run
(no forward pass). The verifier compares every anchor's derivable state with it and replays from
it, never from the trace. *Carried* state -- per-parameter optimizer moments, RNG, the
trainable tensors -- cannot be derived; :func:`end_state_differences` compares it with the full
end state of the replayed window before it (continuity).

Example:
    >>> expected = derive_expected(contract, workdir)          # doctest: +SKIP
    >>> expected.lrs[0]                                        # the lr applied at step 1
    0.0005
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import digest as D
from ..contract import Contract
from ..statecodec import encode_optimizer, from_json_value, optimizer_param_names, to_json_value
from ..live import TRAINER_FIELDS
from ..trace import Anchor

FLOAT_RTOL = 1e-12  # tolerance mode: Python float arithmetic of another libm may differ in the last bits


@dataclass(frozen=True)
class Expected:
    """The contract's initial trainable state and its derivable state at every step.

    ``lrs[s - 1]`` is the lr applied at step ``s``; ``groups[s]`` / ``scheduler[s]`` are the encoded
    optimizer param groups and scheduler state after ``s`` steps (only at anchor steps).
    """

    initial_state: bytes
    schema: Mapping[str, tuple[str, tuple[int, ...]]]
    lrs: tuple[float, ...]
    groups: Mapping[int, Any] = field(repr=False)
    scheduler: Mapping[int, Any] = field(repr=False)
    train_batch_size: int = 0
    initial: Mapping[str, Any] | None = field(default=None, repr=False)  # the tensors (tolerance mode only)


def anchor_steps(contract: Contract) -> list[int]:
    """Steps that carry an anchor: 0, every ``anchor_every``, and the last."""
    n, k = contract.training.max_steps, contract.audit.anchor_every
    return sorted({*range(0, n, k), n})


def derive_expected(contract: Contract, workdir: Path, parts: Any = None) -> Expected:
    """Build the recipe's Trainer, optimizer and scheduler (as ``Trainer.train`` creates them) and
    step the scheduler ``max_steps`` times without training."""
    from ..live import snapshot, trainable_params
    from ..replay import build_recipe, make_trainer
    from ..trace import schema_of

    parts = parts or build_recipe(contract, workdir)
    model = parts.model
    params = trainable_params(model)
    initial, schema = D.state_digest(params), schema_of(params)
    trainer = make_trainer(contract, parts)
    n = contract.training.max_steps
    trainer.create_optimizer_and_scheduler(num_training_steps=n)
    opt, sched = trainer.optimizer, trainer.lr_scheduler
    opt = getattr(opt, "optimizer", opt)
    names = optimizer_param_names(opt, model)
    keep = set(anchor_steps(contract))
    lrs: list[float] = []
    groups: dict[int, Any] = {}
    schedulers: dict[int, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": intended
        for s in range(n + 1):
            if s in keep:
                groups[s] = encode_optimizer({"state": {}, "param_groups": opt.state_dict()["param_groups"]}, names)[1]["param_groups"]
                schedulers[s] = to_json_value(sched.state_dict()) if sched is not None else None
            if s < n:
                lrs.append(float(opt.param_groups[0]["lr"]))
                if sched is not None:
                    sched.step()
    tensors = snapshot(params) if contract.audit.mode == "tolerance" else None
    return Expected(initial, schema, tuple(lrs), groups, schedulers, int(trainer._train_batch_size), tensors)


# --- comparisons -------------------------------------------------------------------------------------


def same_value(a: Any, b: Any, rtol: float = 0.0) -> bool:
    """Structural equality of decoded JSON-like values, types included (``0`` is not ``0.0``, ``1``
    not ``True``); floats within ``rtol`` (0: bit-equal)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if rtol == 0.0 or not (math.isfinite(a) and math.isfinite(b)):
            return D.encode_float(a) == D.encode_float(b)
        return abs(a - b) <= rtol * max(abs(a), abs(b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k], rtol) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y, rtol) for x, y in zip(a, b))
    return a == b


def derivable_differences(anchor: Anchor, expected: Expected, *, rtol: float = 0.0) -> list[str]:
    """Where an anchor's optimizer options, scheduler state or step counter differ from the contract's."""
    out = []
    meta, step = anchor.meta, anchor.step
    opt = meta.get("optimizer")
    recorded = opt.get("param_groups") if isinstance(opt, dict) else None
    want = expected.groups.get(step)
    if not isinstance(recorded, list) or len(recorded) != len(want or []):
        out.append("optimizer param groups")
    else:
        for i, (r, w) in enumerate(zip(recorded, want)):
            if not isinstance(r, dict) or r.get("params") != w["params"]:
                out.append(f"optimizer group {i} parameters")
                continue
            have, exp = _decode(r.get("options")), from_json_value(w["options"])
            if not isinstance(have, dict) or have.keys() != exp.keys():
                out.append(f"optimizer group {i} option names")
                continue
            out += [f"optimizer group {i} {k}: {have[k]!r} != contract's {exp[k]!r}"
                    for k in sorted(exp) if not same_value(have[k], exp[k], rtol)]  # fmt: skip
    if not same_value(_decode(meta.get("scheduler")), from_json_value(expected.scheduler.get(step)), rtol):
        out.append("scheduler state")
    state = _decode(meta.get("trainer_state"))
    if not isinstance(state, dict) or set(state) != set(TRAINER_FIELDS) or state.get("global_step") != step:
        out.append(f"trainer state (keys {sorted(TRAINER_FIELDS)}, global_step {step})")
    return out


def end_state_differences(replayed: Anchor, recorded: Anchor, *, tolerance: float | None = None) -> list[str]:
    """Where the replayed full end state of a window differs from the anchor that closes it.

    ``tolerance`` None: bit-equal everything (a replayed anchor with only ``optimizer_state``, an FSDP
    replay's, by that digest). Otherwise optimizer tensors within relative L2
    ``tolerance`` per tensor (integer and step counters exact), floats in JSON within
    :data:`FLOAT_RTOL`, and the torch generators (CPU and device) compared only where both sides
    ran on the same kind of device (Python's and NumPy's always).
    """
    out: list[str] = []
    rtol = 0.0 if tolerance is None else FLOAT_RTOL
    a, b = dict(replayed.optimizer), dict(recorded.optimizer)
    if replayed.optimizer_state is not None and not a:  # an FSDP replay holds only its shards' joined digest
        if tolerance is not None or replayed.optimizer_state != recorded.part_digests()["optimizer"]:
            out.append("optimizer state digest")
    elif a.keys() != b.keys():
        out.append(f"optimizer tensors: {sorted(set(a) ^ set(b))[:3]} on one side only")
    else:
        for name in sorted(a):
            if not tensors_close(a[name], b[name], tolerance):
                out.append(f"optimizer {name}")
                if len(out) >= 3:
                    break
    ra, rb = replayed.meta.get("optimizer") or {}, recorded.meta.get("optimizer") or {}
    if not same_value(_decode(ra.get("scalars")), _decode(rb.get("scalars")), rtol):
        out.append("optimizer scalars")
    if not same_value(_decode(replayed.meta.get("scheduler")), _decode(recorded.meta.get("scheduler")), rtol):
        out.append("scheduler state")
    sa, sb = _decode(replayed.meta.get("trainer_state")), _decode(recorded.meta.get("trainer_state"))
    for key in TRAINER_FIELDS:
        if not (isinstance(sa, dict) and isinstance(sb, dict) and same_value(sa.get(key), sb.get(key), rtol)):
            out.append(f"trainer state {key}")
    out += _rng_differences(replayed, recorded, exact=tolerance is None)
    return out


def tensors_close(x: Any, y: Any, tolerance: float | None) -> bool:
    """Bit-equal (``tolerance`` None, or integer tensors, or 0-d counters) or relative L2 within ``tolerance``; NaN never."""
    import torch

    if x.dtype != y.dtype or tuple(x.shape) != tuple(y.shape):
        return False
    if tolerance is None or not x.is_floating_point() or x.dim() == 0:
        return D.tensor_digest(x) == D.tensor_digest(y)
    xd, yd = x.double(), y.double()
    if not (torch.isfinite(xd).all() and torch.isfinite(yd).all()):
        return False
    den = float(yd.norm())
    return float((xd - yd).norm()) <= tolerance * max(den, 1e-30)


def moments_distance(replayed: Anchor, recorded: Anchor) -> float:
    """Largest per-tensor relative L2 distance between two anchors' floating optimizer tensors
    (what tolerance mode bounds at a window's end; ``aftune calibrate`` reports it)."""
    worst = 0.0
    for name, y in recorded.optimizer.items():
        x = replayed.optimizer.get(name)
        if x is None or not y.is_floating_point() or y.dim() == 0 or x.shape != y.shape:
            continue
        diff = float((x.double() - y.double()).norm())
        worst = max(worst, diff / max(float(y.double().norm()), 1e-30) if diff else 0.0)
    return worst


_DEVICE_KEYS = ("cuda", "npu", "hpu", "mlu", "musa", "xpu")


def _rng_differences(replayed: Anchor, recorded: Anchor, *, exact: bool) -> list[str]:
    if replayed.world_size != recorded.world_size:
        return []  # one process standing in for several: no per-rank RNG to compare
    out = []
    for rank in range(recorded.world_size):
        a, b = replayed.rng_state(rank), recorded.rng_state(rank)
        same_kind = {k for k in a if k in _DEVICE_KEYS} == {k for k in b if k in _DEVICE_KEYS}
        # another kind of device draws dropout from other generators: only Python's and NumPy's compare
        keys = set(a) | set(b) if exact or same_kind else {"python", "numpy"}
        for key in sorted(keys):
            if not _same_rng(a.get(key), b.get(key)):
                out.append(f"rng {key}" + (f" (rank {rank})" if recorded.world_size > 1 else ""))
    return out


def _same_rng(a: Any, b: Any) -> bool:
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return D.tensor_digest(a) == D.tensor_digest(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_rng(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return type(a) is type(b) and a == b


def _decode(value: Any) -> Any:
    try:
        return from_json_value(value)
    except Exception:  # noqa: BLE001 - a malformed field is simply "different"
        return _Malformed()


class _Malformed:
    def __eq__(self, other: object) -> bool:
        return False

    __hash__ = None  # type: ignore[assignment]
