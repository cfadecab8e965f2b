"""Append-only, crash-safe writing of a trace (atomic files; the chain line is the commit point)."""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import digest as D
from .. import records as R
from ..errors import RecorderError, TraceFormatError, TraceLockedError
from ..safeio import append_durable, atomic_write_bytes, commit_staged, fsync_dir, stage_bytes, stage_safetensors
from .layout import (
    ANCHOR_META_KEYS, ANCHOR_PARTS, CARD, CHAIN, FORMAT, FORMAT_VERSION, HEADER, LOCK, ROOT, SIGNATURE, Anchor, Limits, Schema,
    SHARDED_PARTS, expected_files, parse_chain_line, read_json, anchor_path, checkpoint_path, environment, shard_count,
)  # fmt: skip


class TraceWriter:
    """Append-only, crash-safe writer of one trace directory (holds an exclusive lock)."""

    def __init__(self, root: Path, header: Mapping[str, Any], entries: list[R.ChainEntry], lock: _Lock | None = None) -> None:
        self.root = root
        self.header = dict(header)
        self.entries = entries
        self._head = entries[-1].chain if entries else self.chain_start()
        self._lock = lock
        self.shards = shard_count(self.header["contract"])  # > 1: the ranks write their checkpoint/anchor shards

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
        """Start a new trace in an empty (or absent) directory, or in one that a crash left before
        anything was committed (its leftovers are removed).

        Raises:
            RecorderError: ``trace_exists`` if the directory holds committed records or other files.
        """
        path = Path(root)
        path.mkdir(parents=True, exist_ok=True)
        lock = _Lock.acquire(path)
        with lock.released_on_error():
            _clear_uncommitted(path)
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
        with lock.released_on_error():
            atomic_write_bytes(path / HEADER, D.canonical_json(header))
        return cls(path, header, [], lock)

    @classmethod
    def resume(cls, root: str | os.PathLike[str]) -> TraceWriter:
        """Reopen a crashed trace: take the lock, drop temp files and a torn chain tail,
        and delete step files that no committed record references."""
        path = Path(root)
        lock = _Lock.acquire(path)
        with lock.released_on_error():
            return cls._reopen(path, lock)

    @staticmethod
    def clear_stale_lock(root: str | os.PathLike[str]) -> None:
        """Remove the lock file a killed holder left (a live holder makes this raise ``trace_locked``)."""
        if (Path(root) / LOCK).exists():
            _Lock.acquire(Path(root)).release()

    @classmethod
    def _reopen(cls, path: Path, lock: _Lock) -> TraceWriter:
        for tmp in path.rglob(".*.tmp-*"):
            tmp.unlink()
        header = read_json(path, HEADER, Limits())
        data = (path / CHAIN).read_bytes() if (path / CHAIN).exists() else b""
        entries, good = _committed(header, data)
        if good != len(data):
            with open(path / CHAIN, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
        writer = cls(path, header, entries, lock)
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
            data = b"".join(e.line() for e in self.entries)
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

    def stage_checkpoint(self, step: int, tensors: Mapping[str, Any]) -> list[tuple[Path, Path]]:
        """Write the checkpoint of ``step`` to a temp file; commit it with :meth:`commit_files`."""
        final = folder_for(self.root, checkpoint_path(step))
        return [stage_safetensors(final, tensors, {"format": "pt"})]

    def stage_anchor(self, anchor: Anchor) -> tuple[bytes, list[tuple[Path, Path]]]:
        """Hash an anchor and write its files to temp files; returns its digest and the staged files.
        In a sharded trace the params and optimizer parts are the ranks' files (their digests given)."""
        if set(anchor.meta) != ANCHOR_META_KEYS or anchor.meta["step"] != anchor.step:
            raise RecorderError("anchor_invalid", f"meta keys {sorted(anchor.meta)}", step=anchor.step)
        if self.shards > 1 and (anchor.params_state is None or anchor.optimizer_state is None):
            raise RecorderError("anchor_invalid", "a sharded anchor needs the joined params and optimizer digests", step=anchor.step)
        meta = folder_for(self.root, anchor_path(anchor.step, "meta"))
        digest = anchor.digest()
        parts = [p for p in ANCHOR_PARTS if self.shards == 1 or p not in SHARDED_PARTS]
        staged = [stage_safetensors(self.root / anchor_path(anchor.step, p), getattr(anchor, p), {"format": "pt"})
                  for p in parts]  # fmt: skip
        return digest, [*staged, stage_bytes(meta, D.canonical_json(dict(anchor.meta)))]

    def commit_files(self, staged: list[tuple[Path, Path]]) -> None:
        """Make staged files durable and visible (before the record that refers to them)."""
        for tmp, final in staged:
            commit_staged(tmp, final)

    def write_checkpoint(self, step: int, tensors: Mapping[str, Any]) -> None:
        """Write trainable tensors after ``step`` (before the step's record is appended)."""
        self.commit_files(self.stage_checkpoint(step, tensors))

    def write_anchor(self, anchor: Anchor) -> bytes:
        """Write an anchor's four files; return its digest (to put in the step's record)."""
        digest, staged = self.stage_anchor(anchor)
        self.commit_files(staged)
        return digest

    def append(self, record: Mapping[str, Any]) -> R.ChainEntry:
        """Commit ``record``: one canonical JSON line, appended and fsynced."""
        entry = R.link(self._head, len(self.entries) + 1, record)
        append_durable(self.root / CHAIN, entry.line())
        self.entries.append(entry)
        self._head = entry.chain
        return entry

    def seal(self, *, progress: bool = False) -> dict[str, Any]:
        """:meth:`finalize` with the card rendered from the chain and the last step's state as the
        final state (what the reader requires); the same bytes however often it is run."""
        from ..card import render_card

        last = self.record_for(self.last_step)
        fields = {"format_version": FORMAT_VERSION, "contract_digest": self.header["contract_digest"],
                  "num_steps": R.check_sequence(self.entries), "num_records": len(self.entries),
                  "chain_head": self._head.hex(), "final_state": last["state"]}  # fmt: skip
        return self.finalize(render_card(self.header, fields), bytes.fromhex(last["state"]), progress=progress)

    def finalize(self, card: str, final_state: bytes, *, progress: bool = False) -> dict[str, Any]:
        """Write the card and ``root.json`` (hashing every file; ``progress`` shows a bar); release the
        lock. Returns the root record."""
        from tqdm.auto import tqdm

        R.check_sequence(self.entries)
        atomic_write_bytes(self.root / CARD, card.encode("utf-8"))
        names = sorted(expected_files(self.entries, self.shards))
        files = {rel: D.file_digest(self.root / rel).hex()
                 for rel in tqdm(names, desc="aftune: sealing trace", unit="file", disable=not progress)}  # fmt: skip
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
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _remove_orphans(self) -> None:
        keep = expected_files(self.entries, self.shards) - {CARD}
        for sub in ("checkpoints", "anchors"):
            for p in sorted((self.root / sub).rglob("*"), reverse=True) if (self.root / sub).exists() else []:
                rel = p.relative_to(self.root).as_posix()
                if p.is_file() and rel not in keep:
                    p.unlink()
                elif p.is_dir() and not any(p.iterdir()):
                    p.rmdir()
        for name in (ROOT, CARD, SIGNATURE):  # an unsealed trace has none of these
            (self.root / name).unlink(missing_ok=True)


def folder_for(root: Path, rel: str) -> Path:
    """``root / rel`` with its folders created, each new one made durable in its parent (another
    rank may be creating the same one)."""
    path = root / rel
    missing = [d for d in path.relative_to(root).parents if str(d) != "." and not (root / d).is_dir()]
    for d in reversed(missing):  # outermost first
        (root / d).mkdir(exist_ok=True)
        fsync_dir((root / d).parent)
    return path


def write_rank_file(root: str | os.PathLike[str], rel: str, tensors: Mapping[str, Any]) -> None:
    """Write one rank's shard file of a sharded trace (atomically, durable before it returns): a
    rank other than the main process writes its checkpoint and anchor shards with this, before the
    step's sync, so they are on disk before the main process commits the step's record."""
    commit_staged(*stage_safetensors(folder_for(Path(root), rel), tensors, {"format": "pt"}))


@dataclass(frozen=True)
class Progress:
    """How far a trace directory got, read without taking its lock (see :func:`progress`)."""

    contract_digest: str | None  # None: no readable header (nothing was committed)
    last_step: int  # -1: no committed step record
    sealed: bool  # root.json is there


def progress(root: str | os.PathLike[str]) -> Progress:
    """The committed prefix of a trace directory: its contract, last committed step, and whether
    it is sealed. A torn chain tail is ignored, as :meth:`TraceWriter.resume` would drop it.

    Example:
        >>> progress("runs/trace").last_step   # doctest: +SKIP
        12
    """
    path = Path(root)
    try:
        header = read_json(path, HEADER, Limits())
        data = (path / CHAIN).read_bytes() if (path / CHAIN).exists() else b""
        entries, _ = _committed(header, data)
    except (OSError, TraceFormatError, KeyError, ValueError, TypeError):
        return Progress(None, -1, False)
    last = max((e.record["step"] for e in entries), default=-1)
    return Progress(str(header.get("contract_digest")), last, (path / ROOT).is_file())


def _committed(header: Mapping[str, Any], data: bytes) -> tuple[list[R.ChainEntry], int]:
    """The chain's valid prefix: its entries and its length in bytes."""
    good, entries = 0, []
    head = D.chain_start(bytes.fromhex(header["contract_digest"]), header["run_id"])
    for line in data.split(b"\n")[:-1] if data else []:
        try:
            e = parse_chain_line(line, len(entries) + 1, head)
        except TraceFormatError:
            break
        entries.append(e)
        head = e.chain
        good += len(line) + 1
    return entries, good


_UNCOMMITTED = re.compile(r"(\..*\.tmp-.*|anchors|checkpoints|%s|%s|%s)" % tuple(re.escape(n) for n in (HEADER, CHAIN, LOCK)))


def _clear_uncommitted(path: Path) -> None:
    """Remove what a crash left before a trace's first record (a header, temp files, step-0
    files); refuse a directory with committed records or files that are not a trace's."""
    names = {p.name for p in path.iterdir()} - {LOCK}
    if not names:
        return
    if progress(path).last_step >= 0 or any(not _UNCOMMITTED.fullmatch(n) for n in names):
        raise RecorderError("trace_exists", "directory is not empty; resume the trace or record into a new directory",
                            path=str(path))  # fmt: skip
    for p in sorted(path.rglob("*"), reverse=True):
        if p.name != LOCK or p.parent != path:
            p.unlink() if p.is_file() or p.is_symlink() else p.rmdir()


class _Lock:
    """An exclusive ``flock`` on ``.aftune.lock`` (with the holder's pid in it, for messages).

    The kernel drops the lock when its holder dies, so there is no stale-lock takeover to race;
    release unlinks the file *while still holding* the lock, and an acquirer checks that the file
    it locked is still the one at the path (else it lost to a release and tries again).
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, root: Path) -> _Lock:
        import fcntl

        path = root / LOCK
        for _ in range(64):
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise TraceLockedError("trace_locked", f"another process (pid {holder}) is writing this trace",
                                       path=str(root)) from None  # fmt: skip
            try:
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                return cls(path, fd)
            os.close(fd)  # locked a file a releasing holder had just unlinked: take the new one
        raise TraceLockedError("trace_locked", "the lock file keeps changing", path=str(root))

    def release(self) -> None:
        try:
            self.path.unlink(missing_ok=True)  # while still locked: see the class docstring
        finally:
            os.close(self.fd)

    @contextlib.contextmanager
    def released_on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self.release()
            raise
