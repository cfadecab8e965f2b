"""The trace layout: file names, limits, the anchor type, and helpers shared by writer and reader.

This package (``aftune_hf.trace``) is the ONLY place that knows the trace's file names;
``docs/FORMAT.md`` is the specification.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import digest as D
from .. import records as R
from ..errors import (
    CommitmentError, ManifestMismatchError, PathSafetyError, ResourceLimitError, TraceFormatError, UnsafeContentError,
)  # fmt: skip
from ..safeio import loads_json_strict, read_regular_file, validate_relpath
from ..statecodec import decode_optimizer, decode_rng, from_json_value

FORMAT = "aftune-trace"
FORMAT_VERSION = 6  # 2: an anchor's trainer_state holds only the counters a replay computes with (issue 14);
# 3: ... without num_input_tokens_seen (a logging counter), the header's environment complete (issue 15);
# 4: checkpoints and anchors in folders of SHARD_STEPS steps (the Hub's < 10k entries per folder, issue 17);
# 5: an FSDP run's checkpoints and anchor params/optimizer are one file per rank (issue 17);
# 6: with audit.layer_blocks a step record carries ``cells`` and ``optim`` (issue 19)
HEADER, CHAIN, ROOT, CARD, LOCK = "aftune_trace.json", "chain.jsonl", "root.json", "README.md", ".aftune.lock"
IGNORED = frozenset({".gitattributes"})  # added by the Hub itself; never read
SIGNATURE = "signature.dsse.json"  # the provider's signed root (aftune_hf.attest); outside the root it signs
ANCHOR_PARTS = ("params", "optimizer", "rng")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz", ".pyc")
Schema = Mapping[str, tuple[str, tuple[int, ...]]]


SHARD_STEPS = 1000  # steps per folder: a folder holds at most 1 000 checkpoints or anchor folders
HUB_MAX_FILES = 100_000  # the Hub's recommended most files per repository


def _shard(step: int) -> str:
    return f"{step // SHARD_STEPS:05d}"


def shard_name(rank: int, shards: int) -> str:
    """``rank-00001-of-00002``: which rank's part of a file split across the ranks of an FSDP run."""
    return f"rank-{rank:05d}-of-{shards:05d}"


def checkpoint_path(step: int, rank: int | None = None, shards: int = 1) -> str:
    """``checkpoints/00001/step-00001234.safetensors``: one folder per :data:`SHARD_STEPS` steps; rank
    ``r``'s part of a checkpoint of ``shards`` ranks: ``.../step-00001234.rank-0000r-of-0000W.safetensors``."""
    part = "" if rank is None else f".{shard_name(rank, shards)}"
    return f"checkpoints/{_shard(step)}/step-{step:08d}{part}.safetensors"


def anchor_path(step: int, part: str, rank: int | None = None, shards: int = 1) -> str:
    """``anchors/00001/step-00001230/{params,optimizer,rng}.safetensors`` or ``.../anchor.json`` (``part="meta"``);
    rank ``r``'s part of a sharded one: ``.../params.rank-0000r-of-0000W.safetensors``."""
    folder = f"anchors/{_shard(step)}/step-{step:08d}"
    if part == "meta":
        return f"{folder}/anchor.json"
    return f"{folder}/{part}{'' if rank is None else '.' + shard_name(rank, shards)}.safetensors"


SHARDED_PARTS = ("params", "optimizer")  # the anchor parts each rank of an FSDP run writes its shard of


def checkpoint_files(step: int, shards: int = 1) -> list[str]:
    """The files of the checkpoint of ``step``: one, or one per rank of a sharded run."""
    return [checkpoint_path(step)] if shards == 1 else [checkpoint_path(step, r, shards) for r in range(shards)]


def anchor_files(step: int, part: str, shards: int = 1) -> list[str]:
    """The files of one part of the anchor at ``step`` (params and optimizer: one per rank when sharded)."""
    if shards == 1 or part not in SHARDED_PARTS:
        return [anchor_path(step, part)]
    return [anchor_path(step, part, r, shards) for r in range(shards)]


def step_of_path(rel: str) -> int | None:
    """The step a checkpoint or anchor file belongs to (None for other files, or one in another step's folder)."""
    rank = r"(?:\.rank-\d{5}-of-\d{5})?"
    m = re.fullmatch(rf"(?:checkpoints/(\d{{5}})/step-(\d{{8}}){rank}\.safetensors|anchors/(\d{{5}})/step-(\d{{8}})/[a-z]+{rank}\.(?:safetensors|json))", rel)
    if not m:
        return None
    shard, step = (m.group(1), m.group(2)) if m.group(2) else (m.group(3), m.group(4))
    return int(step) if shard == _shard(int(step)) else None


MAX_SHARDS = 4096  # ranks a sharded trace may be split across (a bound on the files a header can demand)


def shard_count(contract: Mapping[str, Any]) -> int:
    """How many rank files a checkpoint (and an anchor's params and optimizer) is split into: the
    world size of an FSDP run (``trainer_args.fsdp`` set), else 1. ``contract`` is its canonical form."""
    if not isinstance(contract, Mapping):
        raise TraceFormatError("header_invalid", "contract", path=HEADER)
    training, args = contract.get("training"), contract.get("trainer_args")
    if not isinstance(training, Mapping) or not isinstance(args, Mapping) or not args.get("fsdp"):
        return 1
    world = training.get("world_size", 1)
    if type(world) is not int or not 1 <= world <= MAX_SHARDS:
        raise TraceFormatError("header_invalid", f"world_size {world!r}", path=HEADER)
    return world


def file_count(max_steps: int, anchor_every: int, checkpoint_every: int, shards: int = 1) -> int:
    """How many files a finished trace of these settings holds (header, chain, card, root included)."""
    anchors = 1 + max_steps // anchor_every + (max_steps % anchor_every != 0)
    checkpoints = max_steps // checkpoint_every + (max_steps % checkpoint_every != 0)
    per_anchor = sum(len(anchor_files(0, p, shards)) for p in ANCHOR_PARTS) + 1
    return 4 + checkpoints * shards + anchors * per_anchor


def schema_of(tensors: Mapping[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` of a tensor mapping."""
    return {n: (D.dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()}


def environment() -> dict[str, str]:
    """The numerics environment of this process, stored in the header. Exact mode needs the
    verifier's to match (:mod:`aftune_hf.verify.env`); tolerance mode only reports it."""
    import importlib.metadata

    import torch

    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "none"

    gpu = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "peft": version("peft"),
        "trl": version("trl"),
        "accelerate": version("accelerate"),
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "threads": str(torch.get_num_threads()),
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "cuda": str(torch.version.cuda),
        "cudnn": str(torch.backends.cudnn.version()) if gpu else "none",
        "deterministic": str(torch.are_deterministic_algorithms_enabled()),
    }


@dataclass(frozen=True)
class Limits:
    """Verifier-side bounds, checked before allocating (a trace over them is a FAIL)."""

    max_files: int = 200_000
    max_depth: int = 4
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
    params_state: bytes | None = field(default=None, compare=False, repr=False)  # S(params), if already known
    optimizer_state: bytes | None = field(default=None, compare=False, repr=False)  # S(optimizer), likewise

    def part_digests(self) -> dict[str, bytes]:
        return {
            "params": self.params_state or D.state_digest(self.params),
            "optimizer": self.optimizer_state or D.state_digest(self.optimizer),
            "rng": D.state_digest(self.rng),
            "meta": D.json_digest(dict(self.meta)),
        }

    def digest(self) -> bytes:
        return D.anchor_digest(self.part_digests())

    def optimizer_state_dict(self) -> dict[str, Any]:
        return decode_optimizer(self.optimizer, self.meta.get("optimizer"), path=anchor_path(self.step, "meta"))

    def rng_state(self, rank: int = 0) -> dict[str, Any]:
        """The RNG state of process ``rank``. A multi-process run stores one meta per rank (a list)
        and prefixes rank ``r``'s tensors with ``rank{r}.``."""
        meta, path = self.meta.get("rng"), anchor_path(self.step, "meta")
        if not isinstance(meta, list):
            return decode_rng(self.rng, meta, path=path) if rank == 0 else _no_rank(rank, path)
        if not 0 <= rank < len(meta):
            _no_rank(rank, path)
        prefix = f"rank{rank}."
        return decode_rng({k[len(prefix):]: v for k, v in self.rng.items() if k.startswith(prefix)}, meta[rank], path=path)

    @property
    def world_size(self) -> int:
        """How many processes' RNG states the anchor holds."""
        meta = self.meta.get("rng")
        return len(meta) if isinstance(meta, list) else 1

    def scheduler_state(self) -> Any:
        return from_json_value(self.meta.get("scheduler"), path=anchor_path(self.step, "meta"))

    def trainer_state(self) -> Any:
        return from_json_value(self.meta.get("trainer_state"), path=anchor_path(self.step, "meta"))


def _no_rank(rank: int, path: str) -> Any:
    raise TraceFormatError("state_invalid", f"the anchor holds no RNG state for rank {rank}", path=path)


ANCHOR_META_KEYS = {"step", "optimizer", "scheduler", "rng", "trainer_state"}


# --- shared by the writer and the reader ---------------------------------------------------


def expected_files(entries: list[R.ChainEntry], shards: int = 1) -> set[str]:
    files = {HEADER, CHAIN, CARD}
    for e in entries:
        rec = e.record
        if rec["kind"] == "step" and rec["checkpoint"]:
            files.update(checkpoint_files(rec["step"], shards))
        if rec["kind"] in ("start", "step") and rec["anchor"] is not None:
            files.update(f for p in (*ANCHOR_PARTS, "meta") for f in anchor_files(rec["step"], p, shards))
    return files


def parse_chain_line(line: bytes, index: int, prev: bytes, path: str = CHAIN) -> R.ChainEntry:
    """Parse and re-commit one chain line; its chain hash must recompute."""
    obj = loads_json_strict(line, path=path)
    if not isinstance(obj, dict) or set(obj) != {"i", "record", "chain"}:
        raise TraceFormatError("chain_invalid", f"line {index}: keys", path=path)
    if obj["i"] != index or type(obj["i"]) is not int:
        raise CommitmentError("chain_order", f"line {index} says i={obj['i']!r}", path=path)
    entry = R.link(prev, index, obj["record"])
    step = entry.record.get("step", entry.record.get("call"))
    if obj["chain"] != entry.chain.hex():
        raise CommitmentError("chain_break", f"record {index}", path=path, step=step)
    if line != D.canonical_json(obj):
        raise TraceFormatError("chain_invalid", f"line {index} is not canonical JSON", path=path)
    return entry


def parse_chain(data: bytes, head: bytes, path: str = CHAIN) -> list[R.ChainEntry]:
    """Every line of a chain file, in order; a torn last line is an error."""
    if data and not data.endswith(b"\n"):
        raise TraceFormatError("chain_torn", "last line is incomplete", path=path)
    out: list[R.ChainEntry] = []
    for line in data.split(b"\n")[:-1]:
        e = parse_chain_line(line, len(out) + 1, head, path)
        out.append(e)
        head = e.chain
    return out


def read_json(root: Path, rel: str, limits: Limits) -> Any:
    data = read_regular_file(root, rel, max_bytes=limits.max_json_bytes)
    return loads_json_strict(data, path=rel)


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


def scan_files(root: Path, limits: Limits) -> dict[str, int]:
    """Every regular file under ``root`` (relative path -> size), refusing anything unsafe.

    Raises:
        PathSafetyError: symlinks, hard links, special files, unsafe names, too deep.
        UnsafeContentError: pickle-like files (never opened).
        ResourceLimitError: more files than ``limits.max_files``.
    """
    if root.is_symlink() or not root.is_dir():
        raise PathSafetyError("not_a_directory", "must be a real directory", path=str(root))
    files: dict[str, int] = {}
    stack = [(root, "")]
    while stack:
        directory, prefix = stack.pop()
        with os.scandir(directory) as it:
            for entry in it:
                rel = prefix + entry.name
                if len(files) >= limits.max_files:
                    raise ResourceLimitError("too_many_files", f"> {limits.max_files}")
                if rel in IGNORED:
                    continue
                validate_relpath(rel, max_depth=limits.max_depth)
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
