"""Pure hashing: tensor and state digests, RFC 6962 Merkle trees, the hash chain, challenges.

Every formula here is specified in ``docs/FORMAT.md``; golden vectors in
``tests/test_digest.py`` freeze them. All hashes are BLAKE3 in ``derive_key`` mode with one
context string per role (:data:`CONTEXTS`), so a digest made for one role can never be
replayed as another. The Merkle trees are :class:`aftune_hf.merkle.MerkleTree` (generic over
its hash functions; with SHA-256 and RFC 6962's prefixes it reproduces the Certificate
Transparency test vectors) instantiated with BLAKE3 contexts.

Example:
    >>> import torch
    >>> from aftune_hf import digest
    >>> d = digest.state_digest({"w": torch.zeros(2, 2), "b": torch.ones(2)})
    >>> len(d)
    32
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import blake3 as _blake3

from .merkle import RFC6962_SHA256, MerkleTree, _split  # noqa: F401 - re-exported

PROTOCOL_VERSION = 1
DIGEST_SIZE = 32
_CONTEXT_PREFIX = "aftune_hf 2026-11-25 v1 "
CONTEXTS: dict[str, str] = {
    role: _CONTEXT_PREFIX + role
    for role in (
        "tensor",
        "state leaf",
        "state node",
        "state empty",
        "batch leaf",
        "batch node",
        "batch empty",
        "record leaf",
        "step data",
        "record node",
        "record empty",
        "chain",
        "trace root",
        "json",
        "file",
        "files leaf",
        "files node",
        "files empty",
        "model",
        "anchor",
        "challenge",
        "window stream",
        "uniform",
        "cells table",
        "cells rng",
        "cells challenge",
    )
}
_BIG_BUFFER = 128 << 20  # use every core only for buffers this large (threads cost more on small ones)
_PARALLEL_STATE = 32 << 20  # hash a state's tensors side by side from this many bytes on

if sys.byteorder != "little":  # pragma: no cover - tensor bytes are specified little-endian
    raise ImportError("aftune_hf digests are defined on little-endian machines only")


def hasher(role: str, *, size_hint: int = 0) -> Any:
    """A fresh BLAKE3 hasher keyed for ``role`` (one of :data:`CONTEXTS`)."""
    threads = _blake3.blake3.AUTO if size_hint >= _BIG_BUFFER else 1
    return _blake3.blake3(derive_key_context=CONTEXTS[role], max_threads=threads)


def hash_bytes(role: str, *parts: bytes | memoryview) -> bytes:
    """BLAKE3 derive_key(role) over the concatenation of ``parts``."""
    h = hasher(role, size_hint=sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts))
    for p in parts:
        h.update(p)
    return h.digest()


def u64(n: int) -> bytes:
    """Big-endian unsigned 64-bit encoding used inside every hashed structure."""
    return struct.pack(">Q", n)


def lp(data: bytes) -> bytes:
    """Length-prefixed bytes: ``u64(len) || data``."""
    return u64(len(data)) + data


# --- canonical JSON ---------------------------------------------------------------------


def encode_float(x: float) -> str:
    """Exact, language-independent float encoding (C99 ``%a``, Python ``float.hex``)."""
    return float(x).hex()


def decode_float(s: str) -> float:
    """Inverse of :func:`encode_float`."""
    return float.fromhex(s)


def exact_floats(obj: Any) -> Any:
    """``obj`` with every float replaced by :func:`encode_float`, tuples by lists and keys made str,
    ready for :func:`canonical_json`."""
    if isinstance(obj, float):
        return encode_float(obj)
    if isinstance(obj, (list, tuple)):
        return [exact_floats(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): exact_floats(v) for k, v in obj.items()}
    return obj


def canonical_json(obj: Any) -> bytes:
    """RFC 8785-compatible canonical JSON for the float-free subset we hash.

    Keys sorted, no whitespace, UTF-8, integers within ±2**53. Floats are rejected:
    encode them with :func:`encode_float` first, so every implementation agrees on bytes.
    """
    _check_canonical(obj)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _check_canonical(obj: Any) -> None:
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, int):
        if abs(obj) > 2**53:
            raise ValueError(f"integer {obj} outside the canonical JSON range")
        return
    if isinstance(obj, float):
        raise TypeError("floats are not canonical; encode them with encode_float()")
    if isinstance(obj, (list, tuple)):
        for v in obj:
            _check_canonical(v)
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"JSON object keys must be str, got {type(k).__name__}")
            _check_canonical(v)
        return
    raise TypeError(f"{type(obj).__name__} is not canonical JSON")


def json_digest(obj: Any) -> bytes:
    """Digest of the canonical JSON form of ``obj``."""
    return hash_bytes("json", canonical_json(obj))


# --- tensors and states -------------------------------------------------------------------

# safetensors dtype names; the digest binds the name, the shape and the raw bytes.
_TORCH_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
}


_SIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


def dtype_size(name: str) -> int:
    """Bytes per element of a safetensors dtype name (1 for the 8-bit and bool types)."""
    return _SIZES.get(name, 1)


def dtype_name(dtype: Any) -> str:
    """safetensors name (``"F32"``, ``"BF16"``, ...) of a torch dtype."""
    name = str(dtype).removeprefix("torch.")
    try:
        return _TORCH_DTYPES[name]
    except KeyError:
        raise TypeError(f"unsupported tensor dtype {dtype}") from None


def tensor_digest_raw(dtype: str, shape: Sequence[int], data: bytes | memoryview) -> bytes:
    """The tensor digest from its parts: ``H_tensor(lp(dtype) || u64(ndim) || u64(dim)... || bytes)``."""
    header = lp(dtype.encode("ascii")) + u64(len(shape)) + b"".join(u64(d) for d in shape)
    return hash_bytes("tensor", header, data)


def tensor_bytes(t: Any) -> memoryview:
    """Raw little-endian bytes of a tensor, without a copy when it is contiguous on CPU."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    import torch

    flat = t.contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def tensor_digest(t: Any) -> bytes:
    """Digest of a torch tensor's dtype, shape and raw bytes (NaN payloads and -0.0 count)."""
    return tensor_digest_raw(dtype_name(t.dtype), tuple(t.shape), tensor_bytes(t))


def _named_leaf(name: str, digest: bytes) -> bytes:
    return lp(name.encode("utf-8")) + digest


def named_digest(digests: Mapping[str, bytes], tree: MerkleTree) -> bytes:
    """Merkle root over ``lp(name) || digest`` leaves in sorted-name order."""
    return tree.root([_named_leaf(n, digests[n]) for n in sorted(digests)])


def state_digest(tensors: Mapping[str, Any]) -> bytes:
    """Digest of a named set of tensors (model or trainable state): Merkle over sorted names.

    Tensors are hashed in parallel (half the cores; BLAKE3 releases the GIL) when there are
    several and together they hold >= 32 MiB; on a 2-core machine this is one thread.
    """
    names = list(tensors)
    big = sum(t.numel() * t.element_size() for t in tensors.values()) >= _PARALLEL_STATE
    workers = max(1, (os.cpu_count() or 1) // 2)
    if big and workers > 1 and len(names) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(workers, len(names)), thread_name_prefix="aftune-hash") as pool:
            digests = list(pool.map(tensor_digest, (tensors[n] for n in names)))
    else:
        digests = [tensor_digest(tensors[n]) for n in names]
    return named_digest(dict(zip(names, digests)), STATE_TREE)


def batch_digest(batch: Mapping[str, Any]) -> bytes:
    """Digest of one collated micro-batch as fed to the model (non-tensor values ignored).

    The Trainer's ``num_items_in_batch`` is not part of the batch; it is recorded on its own.
    """
    import torch

    return named_digest(
        {n: tensor_digest(t) for n, t in batch.items() if isinstance(t, torch.Tensor)}, BATCH_TREE
    )


def step_data_digest(batches: Sequence[Sequence[bytes]]) -> bytes:
    """One digest for everything a step trained on: ``batches[rank][micro]`` are :func:`batch_digest`
    values, in rank then micro-batch order; the counts are bound in, so no batch can move or vanish."""
    parts = [u64(len(batches))]
    for rank in batches:
        parts += [u64(len(rank)), *rank]
    return hash_bytes("step data", *parts)


def file_digest(path: str | Path) -> bytes:
    """Digest of a file's bytes (memory-mapped)."""
    size = Path(path).stat().st_size
    h = hasher("file", size_hint=size)
    if size:
        h.update_mmap(str(path))
    return h.digest()


def files_digest(files: Mapping[str, bytes]) -> bytes:
    """Merkle root over ``lp(relative posix path) || file digest`` in sorted-path order."""
    return named_digest(files, FILES_TREE)


def model_digest(state: bytes, config: Mapping[str, Any], files: bytes | None = None) -> bytes:
    """Digest of a model: its tensor state digest bound to its canonical architecture config (and
    the :func:`files_digest` of its tokenizer and other companion files, when given)."""
    return hash_bytes("model", state, json_digest(dict(config)), *(() if files is None else (files,)))


def anchor_digest(parts: Mapping[str, bytes]) -> bytes:
    """Digest of an anchor from its part digests (``params``, ``optimizer``, ``rng``, ``meta``)."""
    return hash_bytes("anchor", canonical_json({k: v.hex() for k, v in parts.items()}))


# --- Merkle trees (the generic RFC 6962 tree is in merkle.py) -------------------------------


def _blake3_tree(name: str) -> MerkleTree:
    return MerkleTree(
        leaf=lambda d: hash_bytes(f"{name} leaf", d),
        node=lambda left, right: hash_bytes(f"{name} node", left, right),
        empty=hash_bytes(f"{name} empty"),
    )


STATE_TREE = _blake3_tree("state")
BATCH_TREE = _blake3_tree("batch")
RECORD_TREE = _blake3_tree("record")
FILES_TREE = _blake3_tree("files")


# --- hash chain and trace root --------------------------------------------------------------


def chain_start(contract_digest: bytes, run_id: str) -> bytes:
    """``c_0 = H_chain(contract_digest || lp(run_id))``."""
    return hash_bytes("chain", contract_digest, lp(run_id.encode("utf-8")))


def chain_next(prev: bytes, index: int, leaf_hash: bytes) -> bytes:
    """``c_i = H_chain(c_{i-1} || u64(i) || leaf_i)`` for record number ``i`` (1-based)."""
    return hash_bytes("chain", prev, u64(index), leaf_hash)


def record_leaf(record: Mapping[str, Any]) -> bytes:
    """Leaf hash of a chain record: the record tree's leaf over its canonical JSON."""
    return RECORD_TREE.leaf(canonical_json(dict(record)))


def trace_root(fields: Mapping[str, Any]) -> bytes:
    """The trace root: ``H_root(canonical_json(root fields))`` (see docs/FORMAT.md)."""
    return hash_bytes("trace root", canonical_json(dict(fields)))


# --- challenge ----------------------------------------------------------------------------------


def challenge_seed(trace_root_digest: bytes, nonce: bytes, version: int = PROTOCOL_VERSION) -> bytes:
    """``seed = H_challenge(trace_root || lp(nonce) || u64(version))``."""
    return hash_bytes("challenge", trace_root_digest, lp(nonce), u64(version))


class _XofStream:
    """Deterministic uniform integers from a seed (BLAKE3 keyed XOF, rejection sampling)."""

    def __init__(self, seed: bytes) -> None:
        self._h = hasher("window stream")
        self._h.update(seed)
        self._pos = 0

    def _next_u64(self) -> int:
        out = self._h.digest(length=8, seek=self._pos)
        self._pos += 8
        return int.from_bytes(out, "big")

    def below(self, n: int) -> int:
        """Uniform integer in ``[0, n)``."""
        limit = (1 << 64) - ((1 << 64) % n)
        while True:
            x = self._next_u64()
            if x < limit:
                return x % n


def uniform(seed: bytes, row: int, position: int) -> float:
    """The sampling uniform of generated token ``position`` of batch row ``row``: a float64 in [0, 1)
    from the top 53 bits of ``H_uniform(lp(seed) || u64(row) || u64(position))``."""
    x = int.from_bytes(hash_bytes("uniform", lp(seed), u64(row), u64(position))[:8], "big")
    return (x >> 11) * 2.0**-53


def sample_distinct(seed: bytes, n: int, k: int) -> list[int]:
    """``k`` distinct integers of ``[0, n)`` drawn uniformly from ``seed`` (partial Fisher-Yates), sorted."""
    pool, stream = list(range(n)), _XofStream(seed)
    k = max(0, min(k, n))
    for i in range(k):
        j = i + stream.below(n - i)
        pool[i], pool[j] = pool[j], pool[i]
    return sorted(pool[:k])


def sample_windows(seed: bytes, n_windows: int, k: int) -> list[int]:
    """Choose ``k`` of ``n_windows`` window indices from ``seed``, sorted.

    The first and the last window are always included; the rest are drawn uniformly
    without replacement (partial Fisher-Yates over a BLAKE3 XOF stream of the seed).

    Example:
        >>> sample_windows(b"\\x00" * 32, 10, 4)[0], sample_windows(b"\\x00" * 32, 10, 4)[-1]
        (0, 9)
    """
    if n_windows < 1:
        raise ValueError("there must be at least one window")
    k = max(1, min(k, n_windows))
    chosen = {0, n_windows - 1}
    rest = list(range(1, n_windows - 1))
    stream = _XofStream(seed)
    need = max(0, k - len(chosen))
    for i in range(min(need, len(rest))):
        j = i + stream.below(len(rest) - i)
        rest[i], rest[j] = rest[j], rest[i]
    return sorted(chosen | set(rest[:need]))
