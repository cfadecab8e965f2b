"""Strict reading of an untrusted trace directory."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import digest as D
from .. import records as R
from ..errors import (
    CommitmentError, ManifestMismatchError, ResourceLimitError, TraceFormatError, UnsafeContentError,
)  # fmt: skip

OPTIMIZER_STATES = 4  # per-parameter tensors an optimizer keeps at most (AdamW with amsgrad: 3, plus a step)
RNG_BYTES = 64 << 20  # every RNG state of every rank
from ..safeio import parse_safetensors, read_regular_file
from .layout import (
    ANCHOR_META_KEYS, ANCHOR_PARTS, CHAIN, FORMAT, FORMAT_VERSION, HEADER, PICKLE_SUFFIXES, ROOT, SIGNATURE, Anchor,
    Limits, Schema, expected_files, parse_chain, read_json, scan_files, anchor_files, anchor_path, check_schema, checkpoint_files,
    shard_count, step_of_path,
)  # fmt: skip


@dataclass(frozen=True)
class Integrity:
    """What :meth:`TraceReader.check_integrity` established about a trace."""

    trace_root: bytes
    num_steps: int
    entries: tuple[R.ChainEntry, ...]
    root: Mapping[str, Any] = field(repr=False)

    def steps(self) -> dict[int, Mapping[str, Any]]:
        """The step and start records by step number."""
        return {e.record["step"]: e.record for e in self.entries if e.record["kind"] != "resume"}


_HEADER_KEYS = {"format", "format_version", "protocol_version", "run_id", "contract_digest", "contract", "schema", "environment"}  # fmt: skip
_ROOT_KEYS = {"format", "format_version", "protocol_version", "run_id", "contract_digest", "chain_head", "records_root", "num_records", "num_steps", "final_state", "files", "trace_root"}  # fmt: skip


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same JSON type (``true`` is not ``1``)."""
    return type(a) is type(b) and a == b


class TraceReader:
    """Strict reader of an untrusted trace directory, or of a trace on the Hub read lazily.

    Construction scans the directory: every entry must be a regular file or directory with
    a safe relative name, no pickle-like file, within :class:`Limits`. With ``remote`` (a
    :class:`aftune_hf.hub_pull.RemoteFiles`) the file set is the revision's listing and a file is
    downloaded when first read; once :meth:`check_integrity` has read the root, every file that
    arrives later must have the digest the root lists for it.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, *, limits: Limits = Limits(), remote: Any = None) -> None:
        self.limits = limits
        self.remote = remote
        if remote is None:
            self.root = Path(root)
            self.files = scan_files(self.root, limits)
        else:
            self.root = Path(remote.dest)
            self.files = {rel: size for rel, size in remote.sizes.items()}
            for rel in self.files:
                if rel.lower().endswith(PICKLE_SUFFIXES):
                    raise UnsafeContentError("pickle_not_allowed", "never opened", path=rel)
        self._committed: Mapping[str, str] | None = None  # the root's file digests, once read (remote only)
        self._shards: int | None = None  # from the header, read once

    def local(self, rel: str, max_bytes: int | None = None) -> Path:
        """The local path of trace file ``rel`` (if remote: refused when listed above ``max_bytes``,
        else downloaded and checked against the root first)."""
        if self.remote is not None and rel not in self.remote.fetched:
            if max_bytes is not None and self.files.get(rel, 0) > max_bytes:
                raise ResourceLimitError("file_too_large", f"{self.files[rel]} bytes listed, at most {max_bytes}", path=rel)
            self.remote.fetch(rel)
            want = None if self._committed is None else self._committed.get(rel)
            if want is not None and D.file_digest(self.root / rel).hex() != want:
                raise ManifestMismatchError("hash_mismatch", "file differs from the root", path=rel, step=step_of_path(rel))
        return self.root / rel

    # -- parts ------------------------------------------------------------------------------

    def _json(self, rel: str) -> Any:
        if rel not in self.files:
            raise ManifestMismatchError("missing_file", "required file absent", path=rel)
        self.local(rel, self.limits.max_json_bytes)
        return read_json(self.root, rel, self.limits)

    def header(self) -> dict[str, Any]:
        h = self._json(HEADER)
        if not isinstance(h, dict) or set(h) != _HEADER_KEYS:
            raise TraceFormatError("header_invalid", "header keys", path=HEADER)
        if not (_same(h["format"], FORMAT) and _same(h["format_version"], FORMAT_VERSION)):
            raise TraceFormatError("format_version", f"{h['format']!r} v{h['format_version']!r}", path=HEADER)
        if not _same(h["protocol_version"], D.PROTOCOL_VERSION):
            raise TraceFormatError("format_version", f"protocol {h['protocol_version']!r}", path=HEADER)
        if not isinstance(h["run_id"], str) or not re.fullmatch(r"[0-9A-Za-z_.-]{1,64}", h["run_id"]):
            raise TraceFormatError("header_invalid", "run_id", path=HEADER)
        R.check_hex(h["contract_digest"], "contract_digest", None)
        env = h["environment"]
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise TraceFormatError("header_invalid", "environment must map strings to strings", path=HEADER)
        if not isinstance(h["schema"], dict):
            raise TraceFormatError("header_invalid", "schema", path=HEADER)
        return h

    def schema(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """The trainable-tensor schema the header declares."""
        out = {}
        for n, v in self.header()["schema"].items():
            if not isinstance(v, dict) or set(v) != {"dtype", "shape"} or not isinstance(v["shape"], list):
                raise TraceFormatError("header_invalid", f"schema entry {n}", path=HEADER)
            out[n] = (v["dtype"], tuple(v["shape"]))
        return out

    def entries(self) -> list[R.ChainEntry]:
        """Every chain record, each leaf and chain hash recomputed."""
        h = self.header()
        if CHAIN not in self.files:
            raise ManifestMismatchError("missing_file", "no chain", path=CHAIN)
        self.local(CHAIN, self.limits.max_chain_bytes)
        data = read_regular_file(self.root, CHAIN, max_bytes=self.limits.max_chain_bytes)
        entries = parse_chain(data, D.chain_start(bytes.fromhex(h["contract_digest"]), h["run_id"]))
        if any(e.record["kind"] == "call" for e in entries):
            raise TraceFormatError("record_invalid", "an inference record in a training trace", path=CHAIN)
        return entries

    def read_bytes(self, rel: str) -> bytes:
        """A small file's bytes (bounded like JSON files)."""
        if rel not in self.files:
            raise ManifestMismatchError("missing_file", "required file absent", path=rel)
        self.local(rel, self.limits.max_json_bytes)
        return read_regular_file(self.root, rel, max_bytes=self.limits.max_json_bytes)

    def root_record(self) -> dict[str, Any]:
        r = self._json(ROOT)
        if not isinstance(r, dict) or set(r) != _ROOT_KEYS:
            raise TraceFormatError("root_invalid", "root keys", path=ROOT)
        if not isinstance(r["files"], dict):
            raise TraceFormatError("root_invalid", "files", path=ROOT)
        return r

    def check_integrity(self) -> Integrity:
        """Recompute everything the root commits to; raise on the first inconsistency.

        Checks: header, every chain line, step sequence, root fields against the chain,
        the exact file set (missing / extra), every file's digest, and the trace root.
        """
        header, entries, root = self.header(), self.entries(), self.root_record()
        num_steps = R.check_sequence(entries)
        expect = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "protocol_version": D.PROTOCOL_VERSION,
            "run_id": header["run_id"],
            "contract_digest": header["contract_digest"],
            "chain_head": entries[-1].chain.hex(),
            "records_root": D.RECORD_TREE.root_from_hashes([e.leaf for e in entries]).hex(),
            "num_records": len(entries),
            "num_steps": num_steps,
        }
        for k, v in expect.items():
            if not _same(root[k], v):
                raise CommitmentError("root_mismatch", f"{k}: root says {root[k]!r}, trace gives {v!r}", path=ROOT)
        steps = sum(1 for e in entries if e.record["kind"] != "resume")
        if self.shards() * steps > self.limits.max_files:  # before building the set: the header picks the rank count
            raise ResourceLimitError("too_many_files", f"{self.shards()} ranks x {steps} steps of rank files would exceed "
                                     f"{self.limits.max_files} files", path=HEADER)  # fmt: skip
        wanted = expected_files(entries, self.shards())
        present = set(self.files) - {ROOT, SIGNATURE}
        if missing := sorted(wanted - present):
            raise ManifestMismatchError("missing_file", ", ".join(missing[:5]), path=missing[0], step=step_of_path(missing[0]))
        if extra := sorted(present - wanted):
            raise ManifestMismatchError("extra_file", ", ".join(extra[:5]), path=extra[0])
        if set(root["files"]) != wanted:
            raise CommitmentError("root_mismatch", "files listed in root differ from the trace", path=ROOT)
        for rel in sorted(wanted):  # remote: the files here so far; the rest are checked as they arrive
            if self.remote is not None and rel not in self.remote.fetched:
                continue
            if D.file_digest(self.root / rel).hex() != root["files"][rel]:
                raise ManifestMismatchError("hash_mismatch", "file differs from the root", path=rel, step=step_of_path(rel))
        fields = {k: v for k, v in root.items() if k != "trace_root"}
        last_state = [e.record["state"] for e in entries if e.record["kind"] != "resume"][-1]
        if root["final_state"] != last_state:
            raise CommitmentError("root_mismatch", "final_state is not the last step's state", path=ROOT)
        try:
            trace_root = D.trace_root(fields)
        except (TypeError, ValueError) as e:
            raise TraceFormatError("root_invalid", f"root.json is not canonical: {e}", path=ROOT) from None
        if root["trace_root"] != trace_root.hex():
            raise CommitmentError("root_mismatch", "trace_root does not recompute", path=ROOT)
        self._committed = root["files"]
        return Integrity(trace_root, num_steps, tuple(entries), root)

    def _tensors(self, rel: str, schema: Schema | None, bound: int | None = None) -> dict[str, Any]:
        """Parse a safetensors file; ``bound`` (bytes, from the schema) is checked before reading."""
        if rel not in self.files:
            raise ManifestMismatchError("missing_file", "required file absent", path=rel)
        limit = min(self.limits.max_tensor_file_bytes, bound if bound is not None else self.limits.max_tensor_file_bytes)
        if self.files[rel] > limit:
            raise ResourceLimitError("file_too_large", f"{self.files[rel]} bytes, at most {limit} expected", path=rel,
                                     step=step_of_path(rel))  # fmt: skip
        self.local(rel, limit)
        blob = read_regular_file(self.root, rel, max_bytes=limit)
        tensors = parse_safetensors(blob, path=rel, max_header=self.limits.max_safetensors_header)
        if schema is not None:
            check_schema(tensors, schema, path=rel)
        return tensors

    def _bound(self, schema: Schema | None, copies: int) -> int | None:
        """Most bytes a file of ``copies`` tensors per schema entry (plus small counters) can need."""
        if schema is None:
            return None
        data = sum(math.prod(shape) * D.dtype_size(dtype) for dtype, shape in schema.values())
        return copies * data + 64 * copies * len(schema) + self.limits.max_safetensors_header + 8

    def shards(self) -> int:
        """How many rank files each checkpoint (and anchor params/optimizer) is split into (FSDP: the world size)."""
        if self._shards is None:
            self._shards = shard_count(self.header()["contract"])
        return self._shards

    def _merged(self, files: list[str], schema: Schema | None, bound: int | None) -> dict[str, Any]:
        """One file's tensors, or the tensors of every rank's file joined (:func:`merge_shards`)."""
        if len(files) == 1:
            return self._tensors(files[0], schema, bound)
        merged = merge_shards([self._tensors(f, None, bound) for f in files], path=files[0])
        if schema is not None:
            check_schema(merged, schema, path=files[0])
        return merged

    def checkpoint(self, step: int, schema: Schema | None = None) -> dict[str, Any]:
        """Trainable tensors after ``step``, checked against ``schema`` when given."""
        return self._merged(checkpoint_files(step, self.shards()), schema, self._bound(schema, 1))

    def anchor(self, step: int, schema: Schema | None = None) -> Anchor:
        """The anchor at ``step``; its params are checked against ``schema`` when given."""
        meta = self._json(anchor_path(step, "meta"))
        if not isinstance(meta, dict) or set(meta) != ANCHOR_META_KEYS or meta["step"] != step:
            raise TraceFormatError("anchor_invalid", "anchor.json keys or step", path=anchor_path(step, "meta"))
        try:
            D.canonical_json(meta)  # floats or huge integers cannot be committed: refuse them here
        except (TypeError, ValueError) as e:
            raise TraceFormatError("anchor_invalid", f"anchor.json is not canonical: {e}", path=anchor_path(step, "meta")) from None
        bounds = {"params": self._bound(schema, 1), "optimizer": self._bound(schema, OPTIMIZER_STATES), "rng": RNG_BYTES}
        parts = {p: self._merged(anchor_files(step, p, self.shards()), schema if p == "params" else None, bounds[p])
                 for p in ANCHOR_PARTS}  # fmt: skip
        return Anchor(step, parts["params"], parts["optimizer"], parts["rng"], meta)


def merge_shards(parts: list[Mapping[str, Any]], *, path: str) -> dict[str, Any]:
    """The tensors of an FSDP run's rank files joined: rank ``r`` holds rows ``shard_rows(n, W, r)``
    of every tensor with a dimension (FSDP2's dim-0 split), and a copy of each 0-dim tensor (the
    optimizer's step counters), equal on every rank.

    Raises:
        ManifestMismatchError: ``shard_layout`` if the ranks' tensors are not such a split.
    """
    import torch

    from ..sharded_digest import shard_rows

    names = set(parts[0])
    if any(set(p) != names for p in parts):
        raise ManifestMismatchError("shard_layout", "the ranks' files hold different tensors", path=path)
    out = {}
    for name in sorted(names):
        ts = [p[name] for p in parts]
        first = ts[0]
        if any(t.dtype != first.dtype or t.dim() != first.dim() or t.shape[1:] != first.shape[1:] for t in ts):
            raise ManifestMismatchError("shard_layout", f"{name}: the ranks' shards differ in dtype or shape", path=path)
        if first.dim() == 0:
            if any(D.tensor_digest(t) != D.tensor_digest(first) for t in ts):
                raise ManifestMismatchError("shard_layout", f"{name}: a replicated value differs between ranks", path=path)
            out[name] = first
            continue
        rows = sum(int(t.shape[0]) for t in ts)
        if any(int(t.shape[0]) != b - a for t, (a, b) in zip(ts, (shard_rows(rows, len(ts), r) for r in range(len(ts))))):
            raise ManifestMismatchError("shard_layout", f"{name}: rows {[int(t.shape[0]) for t in ts]} per rank are not "
                                        f"the dim-0 split of {rows} rows over {len(ts)} ranks", path=path)  # fmt: skip
        out[name] = torch.cat(ts)
    return out
