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
        head = data[: b0 - offset].cpu().numpy().tobytes()  # < 1 KiB each: the rest never leaves the device
        tail = data[b1 - offset :].cpu().numpy().tobytes()
        out[name] = Pieces(offset, data.numel(), head, tuple((c, s, roots[at + i]) for i, (c, s) in enumerate(nodes)), tail)
        at += len(nodes)
    return out


# --- the join, on the main process: every tensor's missing nodes in a few batched compressions ---------


def _checked(total: int, parts: Sequence[Pieces]) -> tuple[list[tuple[int, bytes]], dict[tuple[int, int], bytes]]:
    """The raw byte segments and the given subtrees of pieces that must tile ``[0, total)``, in order."""
    segments, nodes, at = [], {}, 0
    n = max(1, -(-total // B.CHUNK))
    for p in sorted(parts, key=lambda p: p.offset):
        if p.offset != at or p.length < 0 or p.offset + p.length > total:
            raise ValueError(f"pieces do not tile the message: a range starts at {p.offset}, expected {at}")
        c0, c1, b0, b1 = _layout(p.offset, p.length, total)
        if len(p.head) != b0 - p.offset or len(p.tail) != p.offset + p.length - b1 or [x[:2] for x in p.nodes] != _subtrees(c0, c1, n):
            raise ValueError(f"pieces of the range at {p.offset} do not match its layout")
        segments += [(p.offset, p.head), (b1, p.tail)]
        nodes.update({(c, size): v for c, size, v in p.nodes})
        at = p.offset + p.length
    if at != total:
        raise ValueError(f"pieces do not tile the message: they end at byte {at} of {total}")
    return [x for x in segments if x[1]], nodes


def _span(segments: list[tuple[int, bytes]], starts: list[int], lo: int, hi: int) -> bytes:
    """Bytes ``[lo, hi)`` of the message from its raw segments (sorted, contiguous where needed)."""
    import bisect

    out, pos = bytearray(), lo
    for off, data in segments[max(0, bisect.bisect_right(starts, lo) - 1):]:
        if off >= hi:
            break
        if off + len(data) > pos:
            if off > pos:
                break
            out += data[pos - off : hi - off]
            pos = off + min(len(data), hi - off)
    if pos != hi:
        raise ValueError(f"pieces leave bytes {pos}..{hi} of a chunk unsent")
    return bytes(out)


def join_all(messages: Sequence[tuple[int, Sequence[Pieces]]], *, key: bytes, flags: int) -> list[bytes]:
    """The BLAKE3 roots of messages (``(total bytes, pieces tiling it)`` each), computed together: the
    chunks no piece covers in one batch, then the missing parent nodes one batch per tree height.

    Raises:
        ValueError: pieces leave a gap, overlap, or disagree with their own ranges.
    """
    given: list[bytes] = []
    leaves: list[tuple[bytes, int, bool]] = []  # chunk bytes, counter, is the root
    parents: list[tuple[int, int, bool, int]] = []  # left id, right id, is the root, height
    ids: list[tuple[str, int]] = []  # ("given" | "leaf" | "parent", index)
    height: list[int] = []
    roots = []
    for total, parts in messages:
        segments, nodes = _checked(total, parts)
        starts = [off for off, _ in segments]

        def plan(lo: int, size: int, root: bool) -> int:
            if (lo, size) in nodes and not root:
                ids.append(("given", len(given)))
                given.append(nodes[lo, size])
                height.append(0)
            elif size == 1:
                ids.append(("leaf", len(leaves)))
                leaves.append((_span(segments, starts, lo * B.CHUNK, min(total, (lo + 1) * B.CHUNK)), lo, root))
                height.append(0)
            else:
                half = 1 << ((size - 1).bit_length() - 1)
                left, right = plan(lo, half, False), plan(lo + half, size - half, False)
                h = 1 + max(height[left], height[right])
                ids.append(("parent", len(parents)))
                parents.append((left, right, root, h))
                height.append(h)
            return len(ids) - 1

        roots.append(plan(0, max(1, -(-total // B.CHUNK)), True))
    compress = B._compressor("cpu", False)
    cv = torch.zeros(8, len(ids), dtype=torch.int64)
    where = {k: [i for i, (kind, _) in enumerate(ids) if kind == k] for k in ("given", "leaf", "parent")}
    if given:
        words = np.frombuffer(b"".join(given), dtype="<u4").reshape(-1, 8).astype(np.int64)
        cv[:, where["given"]] = torch.from_numpy(words).T
    if leaves:
        buf = torch.zeros(len(leaves) * B.CHUNK, dtype=torch.uint8)
        for i, (data, _, _) in enumerate(leaves):
            buf[i * B.CHUNK : i * B.CHUNK + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else 0
        size = np.array([len(d) for d, _, _ in leaves], dtype=np.int64)
        blocks = np.maximum(1, -(-size // B.BLOCK))
        last_flags = np.array([flags | B.CHUNK_END | (B.ROOT if r else 0) for _, _, r in leaves], dtype=np.int64)
        counter = np.array([c for _, c, _ in leaves], dtype=np.int64)
        cv[:, where["leaf"]] = B.chunk_cvs(buf, counter, blocks, size - (blocks - 1) * B.BLOCK, last_flags, key, flags, compress)
    for h in sorted({p[3] for p in parents}):
        todo = [(where["parent"][i], p) for i, p in enumerate(parents) if p[3] == h]
        k = len(todo)
        m = torch.cat([cv[:, [p[0] for _, p in todo]], cv[:, [p[1] for _, p in todo]]])
        node_flags = torch.tensor([flags | B.PARENT | (B.ROOT if p[2] else 0) for _, p in todo], dtype=torch.int64)
        cv[:, [i for i, _ in todo]] = compress(B._key_words(key, k, cv.device), m, torch.zeros(k, dtype=torch.int64),
                                              torch.full((k,), B.BLOCK, dtype=torch.int64), node_flags)  # fmt: skip
    return B._digests(cv[:, roots])


def join(total: int, parts: Sequence[Pieces], *, key: bytes, flags: int) -> bytes:
    """The BLAKE3 root of one message of ``total`` bytes from pieces that tile it (:func:`join_all`)."""
    return join_all([(total, parts)], key=key, flags=flags)[0]


def join_digests(tensors: Sequence[tuple[torch.dtype, Sequence[int], Sequence[Pieces]]]) -> list[bytes]:
    """:func:`aftune_hf.digest.tensor_digest` of each tensor of ``(dtype, shape)`` whose ranks sent those
    pieces (the header is added here), computed together."""
    messages = []
    for dtype, shape, parts in tensors:
        header = _header(dtype, shape)
        if len(header) >= B.CHUNK:
            raise ValueError(f"a tensor of {len(shape)} dimensions is not supported")
        total = len(header) + int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        messages.append((total, [Pieces(0, len(header), header, (), b""), *parts]))
    return join_all(messages, key=B.derive_key(D.CONTEXTS["tensor"]), flags=B.DERIVE_KEY_MATERIAL)


def join_digest(dtype: torch.dtype, shape: Sequence[int], parts: Sequence[Pieces]) -> bytes:
    """:func:`join_digests` of one tensor."""
    return join_digests([(dtype, shape, parts)])[0]


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
