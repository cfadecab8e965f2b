"""The inference log on disk: one chained record and one safetensors file per ``generate`` call.

Layout (docs/FORMAT.md §7)::

    inference_log.json                         header: format, run id, environment
    calls.jsonl                                chained call records (same chain rules as a trace)
    calls/00000/call-00000001.safetensors      prompt / output tokens and activation commitments per row
    roots/00000/root-00000003.json             a published root covering calls 1..3

Call and root files sit in folders of 1 000 (call or root number // 1000), as a trace's steps do:
the Hub advises at most ~10 000 entries per folder.

A call is checkable once a published root covers it.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import digest as D
from .. import records as R
from ..errors import CommitmentError, ManifestMismatchError, TraceFormatError
from ..safeio import append_durable, atomic_save_safetensors, atomic_write_bytes, parse_safetensors, read_regular_file
from .layout import LOCK, SHARD_STEPS, SIGNATURE, Limits, environment, parse_chain, read_json, scan_files
from .writer import _Lock

LOG_FORMAT = "aftune-inference"
LOG_HEADER, CALLS = "inference_log.json", "calls.jsonl"
LOG_VERSION = 2  # 2: one activation value per token, call and root files in folders of 1 000 (1: index too, flat folders)
_ROW_TENSORS = ("prompt", "output", "act_value")
_ROOT_KEYS = {"format", "format_version", "run_id", "num_calls", "chain_head", "records_root", "log_root"}
_HEADER_KEYS = {"format", "format_version", "run_id", "environment"}


def call_path(call: int) -> str:
    return f"calls/{call // SHARD_STEPS:05d}/call-{call:08d}.safetensors"


def root_path(num_calls: int) -> str:
    return f"roots/{num_calls // SHARD_STEPS:05d}/root-{num_calls:08d}.json"


def log_chain_start(run_id: str) -> bytes:
    return D.chain_start(D.json_digest({"format": LOG_FORMAT}), run_id)


class InferenceLogWriter:
    """Append one committed record per ``generate`` call; publish roots when the provider chooses."""

    def __init__(self, root: str | os.PathLike[str], *, run_id: str | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock: _Lock | None = _Lock.acquire(self.root)
        with self._lock.released_on_error():
            self._open(run_id)

    def _open(self, run_id: str | None) -> None:
        if (self.root / LOG_HEADER).exists():
            self.header = read_json(self.root, LOG_HEADER, Limits())
            data = (self.root / CALLS).read_bytes() if (self.root / CALLS).exists() else b""
            good = data[: data.rfind(b"\n") + 1]  # drop a torn last line
            self.entries = parse_chain(good, log_chain_start(self.header["run_id"]), CALLS)
            if good != data:
                atomic_write_bytes(self.root / CALLS, good)
        else:
            self.header = {"format": LOG_FORMAT, "format_version": LOG_VERSION, "run_id": run_id or uuid.uuid4().hex,
                           "environment": environment()}  # fmt: skip
            atomic_write_bytes(self.root / LOG_HEADER, D.canonical_json(self.header))
            self.entries = []
        self._head = self.entries[-1].chain if self.entries else log_chain_start(self.header["run_id"])

    def append(self, tensors: Mapping[str, Any], **fields: Any) -> R.ChainEntry:
        """Write the call's tensors, then commit its record (``fields`` as :func:`records.call_record`)."""
        call = len(self.entries) + 1
        (self.root / call_path(call)).parent.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(self.root / call_path(call), tensors, {"format": "pt"})
        record = R.call_record(call=call, tensors=D.state_digest(tensors), **fields)
        entry = R.link(self._head, call, record)
        append_durable(self.root / CALLS, entry.line())
        self.entries.append(entry)
        self._head = entry.chain
        return entry

    def publish(self) -> dict[str, Any]:
        """Write a root covering every call so far; returns it (publish ``log_root`` to the client)."""
        fields = {"format": LOG_FORMAT, "format_version": LOG_VERSION, "run_id": self.header["run_id"],
                  "num_calls": len(self.entries), "chain_head": self._head.hex(),
                  "records_root": D.RECORD_TREE.root_from_hashes([e.leaf for e in self.entries]).hex()}  # fmt: skip
        root = {**fields, "log_root": D.trace_root(fields).hex()}
        (self.root / root_path(len(self.entries))).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.root / root_path(len(self.entries)), D.canonical_json(root))
        return root

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


@dataclass(frozen=True)
class LogIntegrity:
    """What :meth:`InferenceLogReader.check_integrity` established."""

    log_root: bytes
    num_calls: int  # calls covered by the newest published root
    entries: tuple[R.ChainEntry, ...]


class InferenceLogReader:
    """Strict reader of an untrusted inference log."""

    def __init__(self, root: str | os.PathLike[str], *, limits: Limits = Limits()) -> None:
        self.root = Path(root)
        self.limits = limits
        self.files = scan_files(self.root, limits)

    def check_integrity(self) -> LogIntegrity:
        """Recompute the chain, then check the newest published root against it."""
        if LOG_HEADER not in self.files or CALLS not in self.files:
            raise ManifestMismatchError("missing_file", "not an inference log", path=LOG_HEADER)
        header = read_json(self.root, LOG_HEADER, self.limits)
        if not isinstance(header, dict) or set(header) != _HEADER_KEYS or header["format"] != LOG_FORMAT \
                or header["format_version"] != LOG_VERSION or not re.fullmatch(r"[0-9A-Za-z_.-]{1,64}", str(header["run_id"])):  # fmt: skip
            raise TraceFormatError("format_version", f"not a version-{LOG_VERSION} inference log header", path=LOG_HEADER)
        data = read_regular_file(self.root, CALLS, max_bytes=self.limits.max_chain_bytes)
        entries = parse_chain(data, log_chain_start(header["run_id"]), CALLS)
        if any(e.record["kind"] != "call" for e in entries):
            raise TraceFormatError("record_invalid", "only call records belong in an inference log", path=CALLS)
        roots = sorted(f for f in self.files if f.startswith("roots/"))
        expected = {LOG_HEADER, CALLS, *(call_path(e.record["call"]) for e in entries)}
        extra = sorted(set(self.files) - expected - set(roots) - {LOCK, SIGNATURE})  # a log still being served
        if extra:
            raise ManifestMismatchError("extra_file", ", ".join(extra[:5]), path=extra[0])
        if not roots:
            raise CommitmentError("unpublished", "no published root covers any call")
        root = read_json(self.root, roots[-1], self.limits)
        if not isinstance(root, dict) or set(root) != _ROOT_KEYS or type(root["num_calls"]) is not int:
            raise TraceFormatError("root_invalid", "root keys", path=roots[-1])
        n = root["num_calls"]
        if roots[-1] != root_path(n) or not 0 < n <= len(entries):
            raise CommitmentError("root_mismatch", f"root covers {n} of {len(entries)} calls", path=roots[-1])
        covered = entries[:n]
        fields = {k: v for k, v in root.items() if k != "log_root"}
        expect = {"format": LOG_FORMAT, "format_version": LOG_VERSION, "run_id": header["run_id"], "num_calls": n,
                  "chain_head": covered[-1].chain.hex(),
                  "records_root": D.RECORD_TREE.root_from_hashes([e.leaf for e in covered]).hex()}  # fmt: skip
        if fields != expect or root["log_root"] != D.trace_root(fields).hex():
            raise CommitmentError("root_mismatch", "published root does not recompute", path=roots[-1])
        return LogIntegrity(bytes.fromhex(root["log_root"]), n, tuple(covered))

    def call_tensors(self, entry: R.ChainEntry) -> dict[str, Any]:
        """The call's tensors, strictly parsed, checked against the record's digest and shape rules."""
        rel = call_path(entry.record["call"])
        if rel not in self.files:
            raise ManifestMismatchError("missing_file", "call tensors absent", path=rel, step=entry.record["call"])
        blob = read_regular_file(self.root, rel, max_bytes=self.limits.max_tensor_file_bytes)
        tensors = parse_safetensors(blob, path=rel, max_header=self.limits.max_safetensors_header)
        if D.state_digest(tensors).hex() != entry.record["tensors"]:
            raise ManifestMismatchError("hash_mismatch", "call tensors differ from the record", path=rel,
                                        step=entry.record["call"])  # fmt: skip
        rows = entry.record["rows"]
        want = {f"{k}.{r}" for r in range(rows) for k in _ROW_TENSORS}
        if set(tensors) != want:
            raise ManifestMismatchError("tensor_schema", "call tensors do not match the row layout", path=rel)
        for r in range(rows):
            out, val = tensors[f"output.{r}"], tensors[f"act_value.{r}"]
            ok = (tensors[f"prompt.{r}"].dim() == out.dim() == val.dim() == 1 and val.shape[0] == out.shape[0]
                  and str(out.dtype) == "torch.int64" and str(val.dtype) == "torch.float32")  # fmt: skip
            if not ok:
                raise ManifestMismatchError("tensor_schema", f"row {r} tensors have the wrong shape or dtype", path=rel)
        return tensors
