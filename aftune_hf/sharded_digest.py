"""The standard tensor digest of a tensor no process holds whole (FSDP2 shards), from 32-byte pieces.

A tensor's digest hashes one message: the dtype/shape header, then its raw bytes
(:func:`aftune_hf.digest.tensor_digest`). A shard on dim 0 (FSDP2's ``Shard(0)``) is one contiguous
byte range of that message. BLAKE3 hashes a message as a tree over 1 KiB chunks, so a rank can hash
every whole chunk of its range where the shard lives (:mod:`aftune_hf.device_blake3`, with the
chunks' real counters) and merge them into the aligned power-of-two subtrees its range covers,
every one of which is a node of the message's tree. It sends those (O(log n) values of 32 bytes)
and the < 1 KiB of bytes at each end of its range that share a chunk with its neighbours
(:class:`Pieces`); the main process joins every rank's pieces, and the header, into the root
(:func:`join`). The result is the digest of the unsharded tensor, bit for bit, so checkpoints,
anchors, the state digest and the verifier do not depend on the sharding, and no process ever
holds more than its own shard.

Example:
    >>> import torch
    >>> from aftune_hf import digest
    >>> t = torch.randn(300, 7)
    >>> rows = [shard_rows(300, 3, r) for r in range(3)]
    >>> parts = [local_pieces({"w": t[a:b]}, {"w": (t.dtype, t.shape)}, a)["w"] for a, b in rows]
    >>> join_digest(t.dtype, t.shape, parts) == digest.tensor_digest(t)
    True
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import device_blake3 as B
from . import digest as D

_M = 0xFFFFFFFF


@dataclass(frozen=True)
class Pieces:
    """One rank's part of one tensor message: the bytes ``[offset, offset + length)``.

    ``head``: its bytes up to the first chunk boundary; ``nodes``: ``(first chunk, chunks, chaining
    value)`` of the aligned subtrees covering its whole chunks; ``tail``: its bytes after them.
    A range inside one chunk is all ``head``.
    """

    offset: int
    length: int
    head: bytes
    nodes: tuple[tuple[int, int, bytes], ...]
    tail: bytes


def shard_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` rank ``rank`` holds of a dim-0 shard (``torch.chunk``'s split, as FSDP2's)."""
    size = -(-rows // world) if rows else 0
    return min(rows, rank * size), min(rows, (rank + 1) * size)


def _header(dtype: torch.dtype, shape: Sequence[int]) -> bytes:
    return D.lp(D.dtype_name(dtype).encode("ascii")) + D.u64(len(shape)) + b"".join(D.u64(d) for d in shape)


def _layout(offset: int, length: int, total: int) -> tuple[int, int, int, int]:
    """(first whole chunk, end chunk, first byte of them, end byte of them) of a range."""
    n = max(1, -(-total // B.CHUNK))
    c0 = -(-offset // B.CHUNK)
    c1 = n if offset + length == total else (offset + length) // B.CHUNK
    if c1 <= c0 or n == 1:
        return 0, 0, offset + length, offset + length
    return c0, c1, c0 * B.CHUNK, min(c1 * B.CHUNK, total)


def _subtrees(c0: int, c1: int, n: int) -> list[tuple[int, int]]:
    """Aligned power-of-two blocks covering chunks ``[c0, c1)``, none the whole tree of ``n`` chunks."""
    out, p = [], c0
    while p < c1:
        size = 1
        while p % (size * 2) == 0 and p + size * 2 <= c1 and size * 2 < n:
            size *= 2
        out.append((p, size))
        p += size
    return out


def local_pieces(local: Mapping[str, torch.Tensor], full: Mapping[str, tuple[torch.dtype, Sequence[int]]],
                 first_row: int | Mapping[str, int], *, compile: bool | None = None) -> dict[str, Pieces]:  # fmt: skip
    """This rank's :class:`Pieces` of each tensor: ``local[name]`` holds rows ``first_row`` onward of a
    tensor of dtype and shape ``full[name]``. Every whole chunk is hashed in one batch on the shards'
    device; only the pieces leave it."""
    key = B.derive_key(D.CONTEXTS["tensor"])
    flags = B.DERIVE_KEY_MATERIAL
    plans, bufs, meta, sizes = {}, [], [], []
    for name, t in local.items():
        dtype, shape = full[name]
        header = len(_header(dtype, shape))
        row = int(np.prod(shape[1:], dtype=np.int64)) * t.element_size() if len(shape) else t.element_size()
        start = first_row if isinstance(first_row, int) else first_row[name]
        data = t.detach().contiguous().reshape(-1).view(torch.uint8)
        offset = header + start * row if len(shape) else header
        total = header + int(np.prod(shape, dtype=np.int64)) * t.element_size()
        c0, c1, b0, b1 = _layout(offset, data.numel(), total)
        plans[name] = (offset, data, b0, b1, _subtrees(c0, c1, max(1, -(-total // B.CHUNK))))
        if c1 > c0:
            whole = data[b0 - offset : b1 - offset]
            count = c1 - c0
            padded = torch.zeros(count * B.CHUNK, dtype=torch.uint8, device=data.device)
            padded[: whole.numel()] = whole
            bufs.append(padded)
            size = np.minimum(B.CHUNK, (b1 - b0) - np.arange(count) * B.CHUNK)
            blocks = np.maximum(1, -(-size // B.BLOCK))
            meta.append((np.arange(c0, c1), blocks, size - (blocks - 1) * B.BLOCK))
            sizes += [s for _, s in plans[name][4]]
    roots: list[bytes] = []
    if bufs:
        compress = B._compressor(bufs[0].device.type, bufs[0].device.type == "cuda" if compile is None else compile)
        counter, blocks, last = (np.concatenate([m[i] for m in meta]).astype(np.int64) for i in range(3))
        cv = B.chunk_cvs(torch.cat(bufs), counter, blocks, last, np.full(len(counter), flags | B.CHUNK_END, dtype=np.int64),
                         key, flags, compress)  # fmt: skip
        roots = B._digests(B.merge(cv, np.array(sizes, dtype=np.int64), key, flags, compress, root=False))
    out, at = {}, 0
    for name, (offset, data, b0, b1, nodes) in plans.items():
        raw = data.cpu().numpy().tobytes() if b0 - offset > 0 or data.numel() - (b1 - offset) > 0 else b""
        head = raw[: b0 - offset] if raw else b""
        tail = raw[b1 - offset :] if raw else b""
        out[name] = Pieces(offset, data.numel(), head, tuple((c, s, roots[at + i]) for i, (c, s) in enumerate(nodes)), tail)
        at += len(nodes)
    return out


# --- the join, on the main process (a few hundred compressions per tensor: plain Python) ------------


def _rotr(x: int, n: int) -> int:
    return ((x >> n) | (x << (32 - n))) & _M


def _compress(cv: Sequence[int], block: bytes, counter: int, block_len: int, flags: int) -> list[int]:
    m = list(struct.unpack("<16I", block.ljust(B.BLOCK, b"\0")))
    s = [*cv[:8], *B.IV[:4], counter & _M, counter >> 32, block_len, flags]
    for _ in range(7):
        for i, (a, b, c, d) in enumerate(((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),
                                          (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14))):  # fmt: skip
            s[a] = (s[a] + s[b] + m[2 * i]) & _M
            s[d] = _rotr(s[d] ^ s[a], 16)
            s[c] = (s[c] + s[d]) & _M
            s[b] = _rotr(s[b] ^ s[c], 12)
            s[a] = (s[a] + s[b] + m[2 * i + 1]) & _M
            s[d] = _rotr(s[d] ^ s[a], 8)
            s[c] = (s[c] + s[d]) & _M
            s[b] = _rotr(s[b] ^ s[c], 7)
        m = [m[p] for p in B._PERMUTATION]
    return [s[i] ^ s[i + 8] for i in range(8)]


def _chunk_cv(data: bytes, counter: int, key: list[int], flags: int, root: bool) -> list[int]:
    cv = key
    blocks = [data[i : i + B.BLOCK] for i in range(0, len(data), B.BLOCK)] or [b""]
    for i, block in enumerate(blocks):
        f = flags | (B.CHUNK_START if i == 0 else 0) | ((B.CHUNK_END | (B.ROOT if root else 0)) if i == len(blocks) - 1 else 0)
        cv = _compress(cv, block, counter, len(block), f)
    return cv


def _words(value: bytes) -> list[int]:
    return list(struct.unpack("<8I", value))


def join(total: int, parts: Sequence[Pieces], *, key: bytes, flags: int) -> bytes:
    """The BLAKE3 root of a message of ``total`` bytes from pieces that tile it exactly, in order.

    Raises:
        ValueError: the pieces leave a gap, overlap, or disagree with their own ranges.
    """
    raw = bytearray(total)
    have = np.zeros(total, dtype=bool)
    nodes: dict[tuple[int, int], list[int]] = {}
    at = 0
    for p in sorted(parts, key=lambda p: p.offset):
        if p.offset != at or p.length < 0 or p.offset + p.length > total:
            raise ValueError(f"pieces do not tile the message: a range starts at {p.offset}, expected {at}")
        c0, c1, b0, b1 = _layout(p.offset, p.length, total)
        want = _subtrees(c0, c1, max(1, -(-total // B.CHUNK)))
        if len(p.head) != b0 - p.offset or len(p.tail) != p.offset + p.length - b1 or [n[:2] for n in p.nodes] != want:
            raise ValueError(f"pieces of the range at {p.offset} do not match its layout")
        raw[p.offset : b0] = p.head
        raw[b1 : p.offset + p.length] = p.tail
        have[p.offset : b0] = have[b1 : p.offset + p.length] = True
        have[b0:b1] = True
        nodes.update({(c, s): _words(v) for c, s, v in p.nodes})
        at = p.offset + p.length
    if at != total:
        raise ValueError(f"pieces do not tile the message: they end at byte {at} of {total}")
    kw = _words(key)
    n = max(1, -(-total // B.CHUNK))

    def node(lo: int, size: int, root: bool) -> list[int]:
        if (lo, size) in nodes:
            return nodes[lo, size]
        if size == 1:
            return _chunk_cv(bytes(raw[lo * B.CHUNK : min(total, (lo + 1) * B.CHUNK)]), lo, kw, flags, root)
        left = 1 << ((size - 1).bit_length() - 1)
        block = struct.pack("<16I", *node(lo, left, False), *node(lo + left, size - left, False))
        return _compress(kw, block, 0, B.BLOCK, flags | B.PARENT | (B.ROOT if root else 0))

    return struct.pack("<8I", *node(0, n, True))


def _pieces_py(data: bytes, offset: int, total: int, key: list[int], flags: int) -> Pieces:
    """:class:`Pieces` of a small range computed here (the header: a whole chunk only past 1 KiB)."""
    c0, c1, b0, b1 = _layout(offset, len(data), total)

    def tree(lo: int, size: int) -> list[int]:
        if size == 1:
            return _chunk_cv(data[lo * B.CHUNK - offset : min(total, (lo + 1) * B.CHUNK) - offset], lo, key, flags, False)
        half = size // 2
        return _compress(key, struct.pack("<16I", *tree(lo, half), *tree(lo + half, half)), 0, B.BLOCK, flags | B.PARENT)

    nodes = tuple((c, s, struct.pack("<8I", *tree(c, s))) for c, s in _subtrees(c0, c1, max(1, -(-total // B.CHUNK))))
    return Pieces(offset, len(data), data[: b0 - offset], nodes, data[b1 - offset :])


def join_digest(dtype: torch.dtype, shape: Sequence[int], parts: Sequence[Pieces]) -> bytes:
    """:func:`aftune_hf.digest.tensor_digest` of the tensor of ``dtype`` and ``shape`` whose ranks
    sent ``parts`` (the header is added here)."""
    header = _header(dtype, shape)
    total = len(header) + int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
    key = B.derive_key(D.CONTEXTS["tensor"])
    head = _pieces_py(header, 0, total, _words(key), B.DERIVE_KEY_MATERIAL)
    return join(total, [head, *parts], key=key, flags=B.DERIVE_KEY_MATERIAL)


# --- transport: pieces as bytes (no pickle) -----------------------------------------------------


def encode(pieces: Mapping[str, Pieces]) -> bytes:
    """Pack one rank's pieces (in name order) for the all-gather."""
    out = [struct.pack("<I", len(pieces))]
    for name in sorted(pieces):
        p, n = pieces[name], name.encode("utf-8")
        out += [struct.pack("<IQQII", len(n), p.offset, p.length, len(p.head), len(p.tail)), n, p.head, p.tail,
                struct.pack("<I", len(p.nodes))]  # fmt: skip
        out += [struct.pack("<QQ", c, s) + v for c, s, v in p.nodes]
    return b"".join(out)


def decode(data: bytes) -> dict[str, Pieces]:
    """Inverse of :func:`encode`."""
    view, at = memoryview(data), 0

    def take(n: int) -> bytes:
        nonlocal at
        if at + n > len(view):
            raise ValueError("truncated pieces")
        at += n
        return bytes(view[at - n : at])

    out = {}
    for _ in range(struct.unpack("<I", take(4))[0]):
        k, offset, length, h, t = struct.unpack("<IQQII", take(28))
        name = take(k).decode("utf-8")
        head, tail = take(h), take(t)
        nodes = tuple((*struct.unpack("<QQ", take(16)), take(32)) for _ in range(struct.unpack("<I", take(4))[0]))
        out[name] = Pieces(offset, length, head, nodes, tail)
    return out


def full_shapes(tensors: Mapping[str, Any]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """(dtype, global shape) of each tensor (a ``DTensor``'s is the unsharded one)."""
    return {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
