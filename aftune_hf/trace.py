"""The trace on disk: the ONLY module that knows its file names.

Layout (a valid Hugging Face Hub repository; ``docs/FORMAT.md`` is the specification)::

    README.md                              model card (written at finalize)
    aftune_trace.json                      header: format, contract, run id, schema, environment
    chain.jsonl                            one committed record per line (append-only)
    checkpoints/step-00000005.safetensors  trainable tensors after a step
    anchors/step-00000004/{params,optimizer,rng}.safetensors + anchor.json
    root.json                              the trace root (written last)

:class:`TraceWriter` writes atomically (temp, fsync, rename, fsync dir); the chain line is
the commit point. :class:`TraceReader` treats every byte as hostile: strict paths, no
symlinks or special files, no pickle, bounded sizes, strict JSON and safetensors, tensor
schemas checked.

Example:
    >>> w = TraceWriter.create("runs/t", contract_digest=c.digest(), schema=schema)  # doctest: +SKIP
    >>> w.append(records.start_record(state=..., anchor=...))                       # doctest: +SKIP
    >>> TraceReader("runs/t").check_integrity().num_steps                           # doctest: +SKIP
"""

from __future__ import annotations

import os
import platform
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import digest as D
from . import records as R
from .errors import (
    CommitmentError,
    ManifestMismatchError,
    PathSafetyError,
    RecorderError,
    ResourceLimitError,
    TraceFormatError,
    TraceLockedError,
    UnsafeContentError,
)
from .safeio import (
    atomic_save_safetensors,
    atomic_write_bytes,
    fsync_dir,
    loads_json_strict,
    parse_safetensors,
    read_regular_file,
    validate_relpath,
)
from .statecodec import decode_optimizer, decode_rng, from_json_value

FORMAT = "aftune-trace"
FORMAT_VERSION = 1
HEADER, CHAIN, ROOT, CARD, LOCK = "aftune_trace.json", "chain.jsonl", "root.json", "README.md", ".aftune.lock"
IGNORED = frozenset({".gitattributes"})  # added by the Hub itself; never read
ANCHOR_PARTS = ("params", "optimizer", "rng")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz", ".pyc")
Schema = Mapping[str, tuple[str, tuple[int, ...]]]


def checkpoint_path(step: int) -> str:
    return f"checkpoints/step-{step:08d}.safetensors"


def anchor_path(step: int, part: str) -> str:
    return f"anchors/step-{step:08d}/{part}.safetensors" if part != "meta" else f"anchors/step-{step:08d}/anchor.json"


def step_of_path(rel: str) -> int | None:
    """The step a checkpoint or anchor file belongs to (None for other files)."""
    m = re.fullmatch(r"(?:checkpoints/step-(\d{8})\.safetensors|anchors/step-(\d{8})/[a-z]+\.(?:safetensors|json))", rel)
    return int(m.group(1) or m.group(2)) if m else None


def schema_of(tensors: Mapping[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` of a tensor mapping."""
    return {n: (D.dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()}


def environment() -> dict[str, str]:
    """A fingerprint of the numerics environment, stored in the header (informational)."""
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "cuda": str(torch.version.cuda),
    }


@dataclass(frozen=True)
class Limits:
    """Verifier-side bounds, checked before allocating (a trace over them is a FAIL)."""

    max_files: int = 200_000
    max_depth: int = 3
    max_json_bytes: int = 64 << 20
    max_chain_bytes: int = 1 << 30
    max_tensor_file_bytes: int = 256 << 30
    max_safetensors_header: int = 16 << 20


@dataclass(frozen=True)
class Anchor:
    """Full resumable state at ``step``: trainable params, optimizer, RNG (tensors) + meta (JSON).

    ``meta`` holds ``step``, the encoded optimizer groups, scheduler state, Python/NumPy
    RNG and trainer state (see :mod:`aftune_hf.statecodec`).
    """

    step: int
    params: Mapping[str, Any]
    optimizer: Mapping[str, Any]
    rng: Mapping[str, Any]
    meta: Mapping[str, Any]

    def part_digests(self) -> dict[str, bytes]:
        return {
            "params": D.state_digest(self.params),
            "optimizer": D.state_digest(self.optimizer),
            "rng": D.state_digest(self.rng),
            "meta": D.json_digest(dict(self.meta)),
        }

    def digest(self) -> bytes:
        return D.anchor_digest(self.part_digests())

    def optimizer_state_dict(self) -> dict[str, Any]:
        return decode_optimizer(self.optimizer, self.meta.get("optimizer"), path=anchor_path(self.step, "meta"))

    def rng_state(self) -> dict[str, Any]:
        return decode_rng(self.rng, self.meta.get("rng"), path=anchor_path(self.step, "meta"))

    def scheduler_state(self) -> Any:
        return from_json_value(self.meta.get("scheduler"), path=anchor_path(self.step, "meta"))

    def trainer_state(self) -> Any:
        return from_json_value(self.meta.get("trainer_state"), path=anchor_path(self.step, "meta"))


_ANCHOR_META_KEYS = {"step", "optimizer", "scheduler", "rng", "trainer_state"}


# --- writer ------------------------------------------------------------------------------------


class TraceWriter:
    """Append-only, crash-safe writer of one trace directory (holds an exclusive lock)."""

    def __init__(self, root: Path, header: Mapping[str, Any], entries: list[R.ChainEntry]) -> None:
        self.root = root
        self.header = dict(header)
        self.entries = entries
        self._head = entries[-1].chain if entries else self.chain_start()

    @classmethod
    def create(
        cls,
        root: str | os.PathLike[str],
        *,
        contract_digest: bytes,
        contract: Mapping[str, Any],
        schema: Schema,
        run_id: str | None = None,
    ) -> TraceWriter:
        """Start a new trace in an empty (or absent) directory."""
        path = Path(root)
        path.mkdir(parents=True, exist_ok=True)
        if any(p.name not in (LOCK,) for p in path.iterdir()):
            raise RecorderError("trace_exists", "directory is not empty; resume instead", path=str(path))
        _acquire_lock(path)
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "protocol_version": D.PROTOCOL_VERSION,
            "run_id": run_id or uuid.uuid4().hex,
            "contract_digest": contract_digest.hex(),
            "contract": dict(contract),
            "schema": {n: {"dtype": d, "shape": list(s)} for n, (d, s) in sorted(schema.items())},
            "environment": environment(),
        }
        atomic_write_bytes(path / HEADER, D.canonical_json(header))
        return cls(path, header, [])

    @classmethod
    def resume(cls, root: str | os.PathLike[str]) -> TraceWriter:
        """Reopen a crashed trace: take the lock, drop temp files and a torn chain tail,
        and delete step files that no committed record references."""
        path = Path(root)
        _acquire_lock(path)
        for tmp in path.rglob(".*.tmp-*"):
            tmp.unlink()
        header = _read_json(path, HEADER, Limits())
        data = (path / CHAIN).read_bytes() if (path / CHAIN).exists() else b""
        good, entries = 0, []
        head = D.chain_start(bytes.fromhex(header["contract_digest"]), header["run_id"])
        for line in data.split(b"\n")[:-1] if data else []:
            try:
                e = _parse_entry(line, len(entries) + 1, head)
            except TraceFormatError:
                break
            entries.append(e)
            head = e.chain
            good += len(line) + 1
        if good != len(data):
            with open(path / CHAIN, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
        writer = cls(path, header, entries)
        writer._remove_orphans()
        return writer

    def truncate_after(self, step: int) -> None:
        """Drop every record after the one committing ``step`` (resuming from an earlier step).

        Raises:
            RecorderError: ``resume_gap`` if ``step`` was never committed.
        """
        keep = next((i for i, e in enumerate(self.entries) if e.record["kind"] != "resume" and e.record["step"] == step), None)
        if keep is None:
            self.close()
            raise RecorderError("resume_gap", f"the trace has no committed step {step} (last is {self.last_step})")
        if keep + 1 < len(self.entries):
            self.entries = self.entries[: keep + 1]
            data = b"".join(D.canonical_json(e.to_json()) + b"\n" for e in self.entries)
            atomic_write_bytes(self.root / CHAIN, data)
            self._head = self.entries[-1].chain
            self._remove_orphans()

    def record_for(self, step: int) -> Mapping[str, Any]:
        """The committed start/step record of ``step``."""
        return next(e.record for e in self.entries if e.record["kind"] != "resume" and e.record["step"] == step)

    def chain_start(self) -> bytes:
        return D.chain_start(bytes.fromhex(self.header["contract_digest"]), self.header["run_id"])

    @property
    def last_step(self) -> int:
        return max((e.record["step"] for e in self.entries), default=-1)

    def write_checkpoint(self, step: int, tensors: Mapping[str, Any]) -> None:
        """Write trainable tensors after ``step`` (before the step's record is appended)."""
        (self.root / "checkpoints").mkdir(exist_ok=True)
        atomic_save_safetensors(self.root / checkpoint_path(step), tensors, {"format": "pt"})

    def write_anchor(self, anchor: Anchor) -> bytes:
        """Write an anchor's four files; return its digest (to put in the step's record)."""
        if set(anchor.meta) != _ANCHOR_META_KEYS or anchor.meta["step"] != anchor.step:
            raise RecorderError("anchor_invalid", f"meta keys {sorted(anchor.meta)}", step=anchor.step)
        d = self.root / anchor_path(anchor.step, "meta")
        d.parent.mkdir(parents=True, exist_ok=True)
        for part in ANCHOR_PARTS:
            atomic_save_safetensors(self.root / anchor_path(anchor.step, part), getattr(anchor, part), {"format": "pt"})
        atomic_write_bytes(d, D.canonical_json(dict(anchor.meta)))
        fsync_dir(d.parent.parent)
        return anchor.digest()

    def append(self, record: Mapping[str, Any]) -> R.ChainEntry:
        """Commit ``record``: one canonical JSON line, appended and fsynced."""
        entry = R.link(self._head, len(self.entries) + 1, record)
        line = D.canonical_json(entry.to_json()) + b"\n"
        try:
            fd = os.open(self.root / CHAIN, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise RecorderError("write_failed", f"{e.strerror or e}", path=CHAIN) from e
        self.entries.append(entry)
        self._head = entry.chain
        return entry

    def finalize(self, card: str, final_state: bytes) -> dict[str, Any]:
        """Write the card and ``root.json``; release the lock. Returns the root record."""
        R.check_sequence(self.entries)
        atomic_write_bytes(self.root / CARD, card.encode("utf-8"))
        files = {rel: D.file_digest(self.root / rel).hex() for rel in sorted(_expected_files(self.entries))}
        fields = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "protocol_version": D.PROTOCOL_VERSION,
            "run_id": self.header["run_id"],
            "contract_digest": self.header["contract_digest"],
            "chain_head": self._head.hex(),
            "records_root": D.RECORD_TREE.root_from_hashes([e.leaf for e in self.entries]).hex(),
            "num_records": len(self.entries),
            "num_steps": R.check_sequence(self.entries),
            "final_state": final_state.hex(),
            "files": files,
        }
        root = {**fields, "trace_root": D.trace_root(fields).hex()}
        atomic_write_bytes(self.root / ROOT, D.canonical_json(root))
        self.close()
        return root

    def close(self) -> None:
        (self.root / LOCK).unlink(missing_ok=True)

    def _remove_orphans(self) -> None:
        keep = _expected_files(self.entries) - {CARD}
        for sub in ("checkpoints", "anchors"):
            for p in sorted((self.root / sub).rglob("*"), reverse=True) if (self.root / sub).exists() else []:
                rel = p.relative_to(self.root).as_posix()
                if p.is_file() and rel not in keep:
                    p.unlink()
                elif p.is_dir() and not any(p.iterdir()):
                    p.rmdir()
        (self.root / ROOT).unlink(missing_ok=True)
        (self.root / CARD).unlink(missing_ok=True)


def _acquire_lock(path: Path) -> None:
    try:
        fd = os.open(path / LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        holder = (path / LOCK).read_text(errors="replace").strip()
        if holder.isdigit() and not _pid_alive(int(holder)):
            (path / LOCK).unlink()
            return _acquire_lock(path)
        raise TraceLockedError("trace_locked", f"held by pid {holder}", path=str(path)) from None
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _expected_files(entries: list[R.ChainEntry]) -> set[str]:
    files = {HEADER, CHAIN, CARD}
    for e in entries:
        rec = e.record
        if rec["kind"] == "step" and rec["checkpoint"]:
            files.add(checkpoint_path(rec["step"]))
        if rec["kind"] in ("start", "step") and rec["anchor"] is not None:
            files.update(anchor_path(rec["step"], p) for p in (*ANCHOR_PARTS, "meta"))
    return files


def _parse_entry(line: bytes, index: int, prev: bytes) -> R.ChainEntry:
    obj = loads_json_strict(line, path=CHAIN)
    if not isinstance(obj, dict) or set(obj) != {"i", "record", "leaf", "chain"}:
        raise TraceFormatError("chain_invalid", f"line {index}: keys", path=CHAIN)
    if obj["i"] != index or type(obj["i"]) is not int:
        raise CommitmentError("chain_order", f"line {index} says i={obj['i']!r}", path=CHAIN)
    entry = R.link(prev, index, obj["record"])
    if obj["leaf"] != entry.leaf.hex():
        raise CommitmentError("leaf_mismatch", f"record {index}", path=CHAIN, step=obj["record"]["step"])
    if obj["chain"] != entry.chain.hex():
        raise CommitmentError("chain_break", f"record {index}", path=CHAIN, step=obj["record"]["step"])
    if line != D.canonical_json(obj):
        raise TraceFormatError("chain_invalid", f"line {index} is not canonical JSON", path=CHAIN)
    return entry


def _read_json(root: Path, rel: str, limits: Limits) -> Any:
    data = read_regular_file(root, rel, max_bytes=limits.max_json_bytes)
    return loads_json_strict(data, path=rel)


# --- reader ------------------------------------------------------------------------------------


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


class TraceReader:
    """Strict reader of an untrusted trace directory.

    Construction scans the directory: every entry must be a regular file or directory with
    a safe relative name, no pickle-like file, within :class:`Limits`.
    """

    def __init__(self, root: str | os.PathLike[str], *, limits: Limits = Limits()) -> None:
        self.root = Path(root)
        self.limits = limits
        if self.root.is_symlink() or not self.root.is_dir():
            raise PathSafetyError("not_a_directory", "trace must be a real directory", path=str(root))
        self.files = self._scan()

    def _scan(self) -> dict[str, int]:
        files: dict[str, int] = {}
        stack = [(self.root, "")]
        while stack:
            directory, prefix = stack.pop()
            with os.scandir(directory) as it:
                for entry in it:
                    rel = prefix + entry.name
                    if len(files) >= self.limits.max_files:
                        raise ResourceLimitError("too_many_files", f"> {self.limits.max_files}")
                    if rel in IGNORED:
                        continue
                    validate_relpath(rel, max_depth=self.limits.max_depth)
                    if entry.is_symlink():
                        raise PathSafetyError("symlink", "symbolic links are not allowed", path=rel)
                    if entry.is_dir(follow_symlinks=False):
                        stack.append((Path(entry.path), rel + "/"))
                    elif entry.is_file(follow_symlinks=False):
                        if rel.lower().endswith(PICKLE_SUFFIXES):
                            raise UnsafeContentError("pickle_not_allowed", "never opened", path=rel)
                        st = entry.stat(follow_symlinks=False)
                        if st.st_nlink > 1:
                            raise PathSafetyError("hardlink", "hard-linked file", path=rel)
                        files[rel] = st.st_size
                    else:
                        raise PathSafetyError("special_file", "not a regular file", path=rel)
        return files

    # -- parts ------------------------------------------------------------------------------

    def _json(self, rel: str) -> Any:
        if rel not in self.files:
            raise ManifestMismatchError("missing_file", "required file absent", path=rel)
        return _read_json(self.root, rel, self.limits)

    def header(self) -> dict[str, Any]:
        h = self._json(HEADER)
        if not isinstance(h, dict) or set(h) != _HEADER_KEYS:
            raise TraceFormatError("header_invalid", "header keys", path=HEADER)
        if h["format"] != FORMAT or h["format_version"] != FORMAT_VERSION:
            raise TraceFormatError("format_version", f"{h['format']!r} v{h['format_version']!r}", path=HEADER)
        if h["protocol_version"] != D.PROTOCOL_VERSION:
            raise TraceFormatError("format_version", f"protocol {h['protocol_version']!r}", path=HEADER)
        if not isinstance(h["run_id"], str) or not re.fullmatch(r"[0-9A-Za-z_.-]{1,64}", h["run_id"]):
            raise TraceFormatError("header_invalid", "run_id", path=HEADER)
        R._hex(h["contract_digest"], "contract_digest", None)
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
        data = read_regular_file(self.root, CHAIN, max_bytes=self.limits.max_chain_bytes)
        if data and not data.endswith(b"\n"):
            raise TraceFormatError("chain_torn", "last line is incomplete", path=CHAIN)
        head = D.chain_start(bytes.fromhex(h["contract_digest"]), h["run_id"])
        out: list[R.ChainEntry] = []
        for line in data.split(b"\n")[:-1]:
            e = _parse_entry(line, len(out) + 1, head)
            out.append(e)
            head = e.chain
        return out

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
            if root[k] != v:
                raise CommitmentError("root_mismatch", f"{k}: root says {root[k]!r}, trace gives {v!r}", path=ROOT)
        wanted = _expected_files(entries)
        present = set(self.files) - {ROOT}
        if missing := sorted(wanted - present):
            raise ManifestMismatchError("missing_file", ", ".join(missing[:5]), path=missing[0], step=step_of_path(missing[0]))
        if extra := sorted(present - wanted):
            raise ManifestMismatchError("extra_file", ", ".join(extra[:5]), path=extra[0])
        if set(root["files"]) != wanted:
            raise CommitmentError("root_mismatch", "files listed in root differ from the trace", path=ROOT)
        for rel in sorted(wanted):
            if D.file_digest(self.root / rel).hex() != root["files"][rel]:
                raise ManifestMismatchError("hash_mismatch", "file differs from the root", path=rel, step=step_of_path(rel))
        fields = {k: v for k, v in root.items() if k != "trace_root"}
        last_state = [e.record["state"] for e in entries if e.record["kind"] != "resume"][-1]
        if root["final_state"] != last_state:
            raise CommitmentError("root_mismatch", "final_state is not the last step's state", path=ROOT)
        trace_root = D.trace_root(fields)
        if root["trace_root"] != trace_root.hex():
            raise CommitmentError("root_mismatch", "trace_root does not recompute", path=ROOT)
        return Integrity(trace_root, num_steps, tuple(entries), root)

    def _tensors(self, rel: str, schema: Schema | None) -> dict[str, Any]:
        if rel not in self.files:
            raise ManifestMismatchError("missing_file", "required file absent", path=rel)
        blob = read_regular_file(self.root, rel, max_bytes=self.limits.max_tensor_file_bytes)
        tensors = parse_safetensors(blob, path=rel, max_header=self.limits.max_safetensors_header)
        if schema is not None:
            check_schema(tensors, schema, path=rel)
        return tensors

    def checkpoint(self, step: int, schema: Schema | None = None) -> dict[str, Any]:
        """Trainable tensors after ``step``, checked against ``schema`` when given."""
        return self._tensors(checkpoint_path(step), schema)

    def anchor(self, step: int, schema: Schema | None = None) -> Anchor:
        """The anchor at ``step``; its params are checked against ``schema`` when given."""
        meta = self._json(anchor_path(step, "meta"))
        if not isinstance(meta, dict) or set(meta) != _ANCHOR_META_KEYS or meta["step"] != step:
            raise TraceFormatError("anchor_invalid", "anchor.json keys or step", path=anchor_path(step, "meta"))
        parts = {p: self._tensors(anchor_path(step, p), schema if p == "params" else None) for p in ANCHOR_PARTS}
        return Anchor(step, parts["params"], parts["optimizer"], parts["rng"], meta)


def check_schema(tensors: Mapping[str, Any], schema: Schema, *, path: str) -> None:
    """Exact tensor set, dtypes and shapes, or :class:`ManifestMismatchError`."""
    if missing := sorted(set(schema) - set(tensors)):
        raise ManifestMismatchError("tensor_missing", ", ".join(missing[:5]), path=path)
    if extra := sorted(set(tensors) - set(schema)):
        raise ManifestMismatchError("tensor_extra", ", ".join(extra[:5]), path=path)
    for name, (dtype, shape) in schema.items():
        t = tensors[name]
        if D.dtype_name(t.dtype) != dtype or tuple(t.shape) != tuple(shape):
            raise ManifestMismatchError(
                "tensor_schema", f"{name}: {D.dtype_name(t.dtype)}{list(t.shape)} != {dtype}{list(shape)}", path=path
            )
