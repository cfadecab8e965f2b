"""Standard BLAKE3 computed where the tensors live (CUDA or CPU), in torch operations.

The whole BLAKE3 tree runs on the tensors' device: every 1 KiB chunk of every message is
compressed in parallel (16 sequential blocks, each one batched compression over all chunks),
then the parent nodes level by level (adjacent pairs, an odd last node carried up: the same
left-balanced tree as the reference implementation), and only the 32-byte roots are copied
out. The output is the standard BLAKE3 digest, bit for bit (``tests/test_device_blake3.py``
compares it with the ``blake3`` package on a thousand random inputs), so
:func:`tensor_digests` equals :func:`aftune_hf.digest.tensor_digest` and nothing in the trace
or the verifier changes.

Words are held as int64 in ``[0, 2**32)``: every torch backend has exact int64 add, xor and
shifts, while uint32 arithmetic is not implemented everywhere. On CUDA the compression is
compiled with ``torch.compile`` (fused into one kernel) when ``compile=True``.

Example:
    >>> import blake3, torch
    >>> from aftune_hf.device_blake3 import hash_messages
    >>> msg = torch.arange(3000, dtype=torch.int32).view(torch.uint8)
    >>> hash_messages([msg])[0] == blake3.blake3(msg.numpy().tobytes()).digest()
    True
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from . import digest as D

logger = logging.getLogger(__name__)

IV = (0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19)
CHUNK_START, CHUNK_END, PARENT, ROOT = 1, 2, 4, 8
KEYED_HASH, DERIVE_KEY_CONTEXT, DERIVE_KEY_MATERIAL = 16, 32, 64
CHUNK, BLOCK = 1024, 64
_MASK = 0xFFFFFFFF
_PERMUTATION = (2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8)


def _schedule() -> list[tuple[list[int], ...]]:
    """Per round, the message word indices of the column and diagonal steps (x and y words)."""
    order, rounds = list(range(16)), []
    for _ in range(7):
        rounds.append(([order[i] for i in (0, 2, 4, 6)], [order[i] for i in (1, 3, 5, 7)],
                       [order[i] for i in (8, 10, 12, 14)], [order[i] for i in (9, 11, 13, 15)]))  # fmt: skip
        order = [order[p] for p in _PERMUTATION]
    return rounds


_ROUNDS = _schedule()


def _rotr(x: torch.Tensor, n: int) -> torch.Tensor:
    return ((x >> n) | (x << (32 - n))) & _MASK


def _g(a, b, c, d, mx, my):  # four G functions at once: rows are the four columns (or diagonals)
    a = (a + b + mx) & _MASK
    d = _rotr(d ^ a, 16)
    c = (c + d) & _MASK
    b = _rotr(b ^ c, 12)
    a = (a + b + my) & _MASK
    d = _rotr(d ^ a, 8)
    c = (c + d) & _MASK
    b = _rotr(b ^ c, 7)
    return a, b, c, d


def _round(a, b, c, d, mx, my, nx, ny):
    """One BLAKE3 round: the column step, then the diagonal step (rows rotated into columns)."""
    a, b, c, d = _g(a, b, c, d, mx, my)
    b, c, d = b.roll(-1, 0), c.roll(-2, 0), d.roll(-3, 0)
    a, b, c, d = _g(a, b, c, d, nx, ny)
    return a, b.roll(1, 0), c.roll(2, 0), d.roll(3, 0)


def _compress(cv: torch.Tensor, m: torch.Tensor, counter: torch.Tensor, block_len: torch.Tensor,
              flags: torch.Tensor, round_fn: Any = _round) -> torch.Tensor:  # fmt: skip
    """BLAKE3 compression of N blocks at once: ``cv`` (8, N), ``m`` (16, N), the rest (N,), all
    int64 words; returns the (8, N) chaining values."""
    a, b = cv[:4], cv[4:]
    c = torch.tensor(IV[:4], dtype=torch.int64, device=cv.device).unsqueeze(1).expand(4, cv.shape[1])
    d = torch.stack([counter & _MASK, counter >> 32, block_len, flags])
    for ix, iy, jx, jy in _ROUNDS:
        a, b, c, d = round_fn(a, b, c, d, m[ix], m[iy], m[jx], m[jy])
    return torch.cat([a ^ c, b ^ d])


def _guarded(fn: Any) -> Any:
    """``fn`` on at least two columns (``torch.compile`` would specialise, and recompile, for one);
    if it ever raises (a recompilation for a new shape that fails), the eager operations from then on."""
    state = {"fn": fn}

    def call(cv, m, counter, block_len, flags):
        n = cv.shape[1]
        args = (cv, m, counter, block_len, flags) if n >= 2 else tuple(torch.cat([x, x], dim=-1) for x in (cv, m, counter, block_len, flags))
        try:
            out = state["fn"](*args)
        except Exception as e:  # noqa: BLE001 - same digest either way: fall back, never fail the step
            import warnings

            warnings.warn(f"compiled BLAKE3 failed ({type(e).__name__}: {e}); using the eager torch operations", stacklevel=2)
            state["fn"] = _compress
            out = _compress(*args)
        return out[:, :n]

    return call


_SELF_TEST = (0, 1, 64, 1024, 1025, 4096, 5000)


@functools.cache
def _compressor(device_type: str, compile: bool) -> Any:
    """The compression function for a device: compiled by ``torch.compile`` into one fused kernel
    when ``compile`` is set, checked once against the ``blake3`` package (a compiler that gets it
    wrong, or fails, falls back to the eager torch operations with a warning)."""
    if not compile:
        return _compress
    import blake3
    import warnings

    fn = _guarded(torch.compile(_compress, dynamic=True))
    gen = torch.Generator().manual_seed(0)
    msgs = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen) for n in _SELF_TEST]
    try:
        got = _hash(msgs if device_type == "cpu" else [m.to(device_type) for m in msgs], IV, 0, fn)
        if got == [blake3.blake3(m.numpy().tobytes()).digest() for m in msgs]:
            return fn
        problem = "gives other digests than the blake3 package"
    except Exception as e:  # noqa: BLE001 - any compiler failure means: use the eager operations
        problem = f"failed ({type(e).__name__}: {e})"
    warnings.warn(f"compiled BLAKE3 on {device_type} {problem}; using the eager torch operations", stacklevel=3)
    return _compress


def prepare(device: torch.device | str) -> None:
    """Build (and self-check) the compression for ``device`` ahead of use: on CUDA the first
    ``torch.compile`` takes tens of seconds (then cached on disk by inductor)."""
    device = torch.device(device)
    if device.type == "cuda":
        logger.info("compiling the device BLAKE3 kernel for %s (once)", device)
    _compressor(device.type, device.type == "cuda")


def _words(raw: torch.Tensor) -> torch.Tensor:
    """(N, 16) little-endian uint32 words of N 64-byte blocks, as int64, transposed to (16, N)."""
    return raw.contiguous().view(torch.int32).to(torch.int64).bitwise_and_(_MASK).T


def _key_words(key: Sequence[int] | bytes, n: int, device: torch.device) -> torch.Tensor:
    words = IV if isinstance(key, tuple) else tuple(int.from_bytes(key[i : i + 4], "little") for i in range(0, 32, 4))
    return torch.tensor(words, dtype=torch.int64, device=device).unsqueeze(1).expand(8, n).contiguous()


def hash_messages(messages: Sequence[torch.Tensor | Sequence[torch.Tensor]], *, key: bytes | None = None, flags: int = 0,
                  compile: bool | None = None) -> list[bytes]:  # fmt: skip
    """Standard 32-byte BLAKE3 digests of uint8 tensors on one device, in one batch. A message may
    be a sequence of tensors, hashed as their concatenation (copied once, into the chunk buffer).

    ``key`` (32 bytes) with ``flags=KEYED_HASH`` is keyed mode, with ``flags=DERIVE_KEY_MATERIAL``
    the second half of derive_key mode (see :func:`derive_key`); plain hashing by default.
    ``compile`` defaults to ``True`` on CUDA.
    """
    if not messages:
        return []
    first = messages[0] if isinstance(messages[0], torch.Tensor) else next(iter(messages[0]), None)
    device = first.device if first is not None else torch.device("cpu")
    compress = _compressor(device.type, device.type == "cuda" if compile is None else compile)
    return _hash(messages, IV if key is None else key, flags, compress)


def _hash(messages: Sequence[Any], key: tuple | bytes, flags: int, compress: Any) -> list[bytes]:
    parts = [[m] if isinstance(m, torch.Tensor) else list(m) for m in messages]
    device = next((p.device for ps in parts for p in ps), torch.device("cpu"))
    lengths = [sum(int(p.numel()) for p in ps) for ps in parts]
    counts = [max(1, -(-n // CHUNK)) for n in lengths]
    buf = torch.zeros(sum(counts) * CHUNK, dtype=torch.uint8, device=device)
    at = 0
    for ps, c in zip(parts, counts):
        end = at + c * CHUNK
        for p in ps:
            if p.device != device or p.dtype != torch.uint8:
                raise ValueError("messages must be uint8 tensors on one device")
            buf[at : at + p.numel()] = p.reshape(-1)
            at += p.numel()
        at = end
    counter, nblocks, last_len, last_flags = _chunk_meta(lengths, counts, flags)
    cv = chunk_cvs(buf, counter, nblocks, last_len, last_flags, key, flags, compress)
    return _digests(merge(cv, np.array(counts, dtype=np.int64), key, flags, compress))


def chunk_cvs(buf: torch.Tensor, counter: np.ndarray, nblocks: np.ndarray, last_len: np.ndarray, last_flags: np.ndarray,
              key: tuple | bytes, flags: int, compress: Any) -> torch.Tensor:  # fmt: skip
    """Chaining values (8, N) of the N chunks in ``buf`` (N x 1 KiB, zero-padded): per chunk its
    counter, block count, last block's length and flags (which carry CHUNK_END, and ROOT if it is one)."""
    device = buf.device
    chunks = buf.view(-1, CHUNK // BLOCK, BLOCK)  # (chunks, 16 blocks, 64 bytes)
    counter, nblocks, last_len, last_flags = (torch.from_numpy(v).to(device) for v in (counter, nblocks, last_len, last_flags))
    n = chunks.shape[0]
    cv = _key_words(key, n, device)
    full = torch.full((n,), BLOCK, dtype=torch.int64, device=device)
    for j in range(int(nblocks.max()) if n else 0):
        active = nblocks > j
        last = nblocks == j + 1
        block_flags = torch.where(last, last_flags, flags) | (CHUNK_START if j == 0 else 0)
        out = compress(cv, _words(chunks[:, j]), counter, torch.where(last, last_len, full), block_flags)
        cv = torch.where(active, out, cv)
    return cv


def _segments(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For segments of ``counts`` items: each item's segment and its index within the segment."""
    seg = np.repeat(np.arange(len(counts)), counts)
    starts = np.cumsum(counts) - counts
    return seg, np.arange(int(counts.sum())) - starts[seg]


def _chunk_meta(lengths: Sequence[int], counts: Sequence[int], flags: int) -> tuple[np.ndarray, ...]:
    """Per chunk: its counter (index in its message), block count, last block's length and flags."""
    counts_a = np.array(counts, dtype=np.int64)
    seg, counter = _segments(counts_a)
    size = np.minimum(CHUNK, np.array(lengths, dtype=np.int64)[seg] - counter * CHUNK)
    blocks = np.maximum(1, -(-size // BLOCK))
    last_flags = flags | CHUNK_END | np.where(counts_a[seg] == 1, ROOT, 0)
    return counter, blocks, size - (blocks - 1) * BLOCK, last_flags.astype(np.int64)


def merge(cv: torch.Tensor, counts: np.ndarray, key: tuple | bytes, flags: int, compress: Any, *, root: bool = True) -> torch.Tensor:
    """Parent levels of every segment's tree at once (segments of ``counts`` chaining values); returns
    each segment's top (8, segments). Per segment and level: nodes (0,1), (2,3), ... are joined, an odd
    last node is carried up unchanged. ``root=False``: the tops are inner nodes (no ROOT flag)."""
    dev = cv.device
    while (counts > 1).any():
        starts = np.cumsum(counts) - counts
        pairs, odd = counts // 2, counts % 2
        new_counts = pairs + odd
        new_starts = np.cumsum(new_counts) - new_counts
        seg, i = _segments(pairs)
        left = starts[seg] + 2 * i
        k = len(left)
        m = torch.cat([cv[:, torch.from_numpy(left).to(dev)], cv[:, torch.from_numpy(left + 1).to(dev)]])
        node_flags = flags | PARENT | np.where((counts[seg] == 2) & root, ROOT, 0)
        parents = compress(_key_words(key, k, dev), m, torch.zeros(k, dtype=torch.int64, device=dev),
                           torch.full((k,), BLOCK, dtype=torch.int64, device=dev),
                           torch.from_numpy(node_flags.astype(np.int64)).to(dev))  # fmt: skip
        nxt = torch.empty(8, int(new_counts.sum()), dtype=torch.int64, device=dev)
        nxt[:, torch.from_numpy(new_starts[seg] + i).to(dev)] = parents
        carried = np.flatnonzero(odd)
        if len(carried):
            src = torch.from_numpy(starts[carried] + counts[carried] - 1).to(dev)
            nxt[:, torch.from_numpy(new_starts[carried] + pairs[carried]).to(dev)] = cv[:, src]
        cv, counts = nxt, new_counts
    return cv


def _digests(cv: torch.Tensor) -> list[bytes]:
    """(8, N) words on any device -> N 32-byte values."""
    return [row.tobytes() for row in cv.T.to("cpu").numpy().astype("<u4")]


@functools.cache
def derive_key(context: str) -> bytes:
    """The 32-byte key BLAKE3's derive_key mode derives from ``context`` (hashed on the CPU)."""
    ctx = torch.frombuffer(bytearray(context.encode("utf-8")), dtype=torch.uint8)
    return hash_messages([ctx], flags=DERIVE_KEY_CONTEXT, compile=False)[0]


def tensor_message(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bytes :func:`aftune_hf.digest.tensor_digest` hashes, as uint8 tensors on ``t``'s device:
    the dtype/shape header, then the raw little-endian bytes (a view, no copy when contiguous)."""
    header = D.lp(D.dtype_name(t.dtype).encode("ascii")) + D.u64(t.dim()) + b"".join(D.u64(d) for d in t.shape)
    head = torch.frombuffer(bytearray(header), dtype=torch.uint8).to(t.device)
    return head, t.detach().contiguous().reshape(-1).view(torch.uint8)


def tensor_digests(tensors: Sequence[torch.Tensor], *, compile: bool | None = None) -> list[bytes]:
    """:func:`aftune_hf.digest.tensor_digest` of each tensor, computed on their (common) device;
    only 32 bytes per tensor leave it."""
    key = derive_key(D.CONTEXTS["tensor"])
    return hash_messages([tensor_message(t) for t in tensors], key=key, flags=DERIVE_KEY_MATERIAL, compile=compile)


def state_digest(tensors: Mapping[str, torch.Tensor], *, compile: bool | None = None) -> bytes:
    """:func:`aftune_hf.digest.state_digest` with the tensor digests computed on the device.

    Example:
        >>> import torch
        >>> from aftune_hf import digest
        >>> s = {"w": torch.randn(40, 40), "b": torch.ones(3)}
        >>> state_digest(s) == digest.state_digest(s)
        True
    """
    names = sorted(tensors)
    groups: dict[torch.device, list[str]] = {}
    for n in names:
        groups.setdefault(tensors[n].device, []).append(n)
    digests: dict[str, bytes] = {}
    for group in groups.values():
        digests.update(zip(group, tensor_digests([tensors[n] for n in group], compile=compile)))
    return D.named_digest(digests, D.STATE_TREE)
