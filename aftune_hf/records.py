"""Chain records: their exact schemas, validation, and the chain arithmetic over them.

A trace's ``chain.jsonl`` is a sequence of records, each committed by a leaf hash and a
chain hash (``docs/FORMAT.md``); a line stores the record and its chain hash (the leaf is
recomputed). Three kinds exist:

* ``start``  -- step 0: the initial trainable-state digest and the step-0 anchor digest;
* ``step``   -- one optimizer step: one digest over every rank's micro-batches, loss, lr, grad norm,
  state digest after the step, whether a checkpoint was written, the anchor digest if any; with
  ``audit.layer_blocks`` also ``cells`` (the digest of the step's cell table,
  :mod:`aftune_hf.cells.track`) and ``optim`` (the optimizer state's digest after the step);
* ``resume`` -- recording continued after a crash from the committed ``step``.

Floats are stored as exact hex strings (``float.hex``). Validation is strict: exact key
sets, exact types, 64-char lowercase hex digests.

Example:
    >>> rec = step_record(step=1, batches=[[b"\\0" * 32]], num_items=10, loss=1.5, lr=1e-3,
    ...                   grad_norm=0.5, state=b"\\1" * 32, checkpoint=True, anchor=None)
    >>> validate_record(rec)["kind"]
    'step'
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import digest as D
from .errors import CommitmentError, TraceFormatError

_HEX = re.compile(r"^[0-9a-f]{64}$")
_KEYS = {
    "start": {"kind", "step", "state", "anchor"},
    "step": {"kind", "step", "data", "num_items", "loss", "lr", "grad_norm", "state", "checkpoint", "anchor"},
    "resume": {"kind", "step", "reason"},
    "call": {"kind", "call", "rows", "config", "weights", "seed", "tensors"},
}  # fmt: skip
CELL_KEYS = frozenset({"cells", "optim"})  # a step record's commitments for layer-block cells (audit.layer_blocks)
CALL_CONFIG_KEYS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens",
                "min_new_tokens", "eos_token_id", "pad_token_id")  # fmt: skip
_WEIGHT_KEYS = {"params", "model", "adapter"}


@dataclass(frozen=True)
class ChainEntry:
    """One line of ``chain.jsonl``: record number ``index`` (1-based), its leaf and chain hash.

    The line holds ``i``, ``record`` and ``chain``; the leaf is derived from the record, so
    storing it would only add bytes (about 75 per step)."""

    index: int
    record: Mapping[str, Any]
    leaf: bytes
    chain: bytes

    def to_json(self) -> dict[str, Any]:
        return {"i": self.index, "record": dict(self.record), "chain": self.chain.hex()}

    def line(self) -> bytes:
        """The entry as one line of a chain file: canonical JSON and a newline."""
        return D.canonical_json(self.to_json()) + b"\n"


def start_record(*, state: bytes, anchor: bytes) -> dict[str, Any]:
    """The step-0 record."""
    return {"kind": "start", "step": 0, "state": state.hex(), "anchor": anchor.hex()}


def step_record(
    *,
    step: int,
    batches: Sequence[Sequence[bytes]],
    num_items: int | None,
    loss: float,
    lr: float,
    grad_norm: float | None,
    state: bytes,
    checkpoint: bool,
    anchor: bytes | None,
    cells: bytes | None = None,
    optim: bytes | None = None,
) -> dict[str, Any]:
    """The record of one optimizer step; ``batches[rank][micro]`` are batch digests, committed as one
    :func:`~aftune_hf.digest.step_data_digest`; ``cells``/``optim`` only with layer-block cells."""
    extra = {} if cells is None else {"cells": cells.hex(), "optim": optim.hex()}
    return {**extra,
        "kind": "step",
        "step": step,
        "data": D.step_data_digest(batches).hex(),
        "num_items": num_items,
        "loss": D.encode_float(loss),
        "lr": D.encode_float(lr),
        "grad_norm": None if grad_norm is None else D.encode_float(grad_norm),
        "state": state.hex(),
        "checkpoint": bool(checkpoint),
        "anchor": None if anchor is None else anchor.hex(),
    }


def resume_record(*, step: int, reason: str) -> dict[str, Any]:
    """Recording resumed after the committed ``step``."""
    return {"kind": "resume", "step": step, "reason": reason[:200]}


def call_record(
    *, call: int, rows: int, config: Mapping[str, Any], weights: Mapping[str, str | None], seed: bytes | None,
    tensors: bytes,
) -> dict[str, Any]:
    """The record of one ``generate`` call: decoding config, served weights, seed, tensor digest."""
    return {"kind": "call", "call": call, "rows": rows, "config": dict(config), "weights": dict(weights),
            "seed": None if seed is None else seed.hex(), "tensors": tensors.hex()}  # fmt: skip


def _bad(detail: str, step: Any = None) -> TraceFormatError:
    return TraceFormatError("record_invalid", detail, step=step if isinstance(step, int) else None)


def check_hex(v: Any, what: str, step: Any = None) -> None:
    if not isinstance(v, str) or not _HEX.fullmatch(v):
        raise _bad(f"{what} is not a 64-char lowercase hex digest", step)


def _float(v: Any, what: str, step: Any) -> None:
    try:
        ok = isinstance(v, str) and len(v) < 40 and D.encode_float(D.decode_float(v)) == v
    except (ValueError, OverflowError):
        ok = False
    if not ok:
        raise _bad(f"{what} is not an exact hex float", step)


def _int(v: Any, what: str, step: Any, lo: int = 0) -> None:
    if type(v) is not int or not lo <= v < 2**53:
        raise _bad(f"{what} must be an integer >= {lo}", step)


def validate_record(rec: Any) -> Mapping[str, Any]:
    """Check a record against its schema; return it unchanged or raise :class:`TraceFormatError`."""
    if not isinstance(rec, dict) or not isinstance(rec.get("kind"), str) or rec["kind"] not in _KEYS:
        raise _bad("unknown record kind")
    step = rec.get("step")
    keys = set(rec) - (CELL_KEYS if rec["kind"] == "step" and CELL_KEYS <= set(rec) else set())
    if keys != _KEYS[rec["kind"]]:
        raise _bad(f"{rec['kind']} record keys {sorted(rec)}", step)
    kind = rec["kind"]
    if kind == "call":
        return _validate_call(rec)
    _int(step, "step", step)
    if kind == "start":
        if step != 0:
            raise _bad("start record must be step 0", step)
        check_hex(rec["state"], "state", step)
        check_hex(rec["anchor"], "anchor", step)
    elif kind == "resume":
        if not isinstance(rec["reason"], str) or len(rec["reason"]) > 200:
            raise _bad("resume reason", step)
    else:
        _int(step, "step", step, lo=1)
        check_hex(rec["data"], "data digest", step)
        if rec["num_items"] is not None:
            _int(rec["num_items"], "num_items", step)
        _float(rec["loss"], "loss", step)
        _float(rec["lr"], "lr", step)
        if rec["grad_norm"] is not None:
            _float(rec["grad_norm"], "grad_norm", step)
        check_hex(rec["state"], "state", step)
        if type(rec["checkpoint"]) is not bool:
            raise _bad("checkpoint must be a boolean", step)
        if rec["anchor"] is not None:
            check_hex(rec["anchor"], "anchor", step)
        for key in CELL_KEYS & set(rec):
            check_hex(rec[key], key, step)
    return rec


def _validate_call(rec: dict[str, Any]) -> dict[str, Any]:
    _int(rec["call"], "call", None, lo=1)
    _int(rec["rows"], "rows", None, lo=1)
    cfg, w = rec["config"], rec["weights"]
    if not isinstance(cfg, dict) or set(cfg) != set(CALL_CONFIG_KEYS):
        raise _bad("call config keys")
    for k, v in cfg.items():
        if not (v is None or type(v) in (bool, int) or (isinstance(v, str) and len(v) < 40)):
            raise _bad(f"call config {k}")
    if not isinstance(w, dict) or set(w) != _WEIGHT_KEYS:
        raise _bad("call weights keys")
    for k, v in w.items():
        if v is not None:
            check_hex(v, f"weights.{k}")
    if rec["seed"] is not None:
        check_hex(rec["seed"], "seed")
    check_hex(rec["tensors"], "tensors")
    return rec


def hex_float(rec: Mapping[str, Any], key: str) -> float:
    """A record's float field (``nan`` if absent)."""
    v = rec.get(key)
    return math.nan if v is None else D.decode_float(v)


def link(prev: bytes, index: int, record: Mapping[str, Any]) -> ChainEntry:
    """Commit ``record`` as record number ``index`` after chain hash ``prev``."""
    validate_record(record)
    leaf = D.record_leaf(record)
    return ChainEntry(index, dict(record), leaf, D.chain_next(prev, index, leaf))


def check_sequence(entries: Sequence[ChainEntry]) -> int:
    """Check step numbering: ``start`` first, then steps 1, 2, ... each exactly once.

    A ``resume`` record must name the last committed step. Returns the last step.

    Raises:
        CommitmentError: ``missing_start``, ``duplicate_step``, ``step_gap`` or ``resume_invalid``.
    """
    if not entries or entries[0].record["kind"] != "start":
        raise CommitmentError("missing_start", "the first record must be the step-0 start record")
    last = 0
    for e in entries[1:]:
        rec = e.record
        if rec["kind"] == "start":
            raise CommitmentError("duplicate_step", "a second start record", step=0)
        if rec["kind"] == "resume":
            if rec["step"] != last:
                raise CommitmentError("resume_invalid", f"resume names step {rec['step']}, last is {last}")
            continue
        if rec["step"] <= last:
            raise CommitmentError("duplicate_step", f"step {rec['step']} after {last}", step=rec["step"])
        if rec["step"] != last + 1:
            raise CommitmentError("step_gap", f"step {rec['step']} follows {last}", step=rec["step"])
        last = rec["step"]
    return last
