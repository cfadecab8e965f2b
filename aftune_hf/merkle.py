"""A generic RFC 6962 Merkle tree (leaf and node hashes are parameters) and its SHA-256 instance.

With SHA-256 and the 0x00/0x01 prefixes (:data:`RFC6962_SHA256`) it reproduces the Certificate
Transparency test vectors; :mod:`aftune_hf.digest` instantiates it with BLAKE3 contexts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class MerkleTree:
    """An RFC 6962 Merkle tree over a leaf hash and a node hash.

    ``MTH({}) = empty``, ``MTH({d}) = leaf(d)``,
    ``MTH(D[n]) = node(MTH(D[:k]), MTH(D[k:]))`` with ``k`` the largest power of two < n.

    Example:
        >>> RFC6962_SHA256.root([b""]).hex()[:16]
        '6e340b9cffb37a98'
    """

    leaf: Callable[[bytes], bytes]
    node: Callable[[bytes, bytes], bytes]
    empty: bytes

    def root(self, leaves: Sequence[bytes]) -> bytes:
        """Root over raw leaf data."""
        return self.root_from_hashes([self.leaf(d) for d in leaves])

    def root_from_hashes(self, hashes: Sequence[bytes]) -> bytes:
        """Root over already-hashed leaves."""
        if not hashes:
            return self.empty
        level = list(hashes)
        return self._subtree(level, 0, len(level))

    def _subtree(self, hashes: list[bytes], lo: int, hi: int) -> bytes:
        n = hi - lo
        if n == 1:
            return hashes[lo]
        k = _split(n)
        return self.node(self._subtree(hashes, lo, lo + k), self._subtree(hashes, lo + k, hi))

    def inclusion_proof(self, hashes: Sequence[bytes], index: int) -> list[bytes]:
        """Audit path (RFC 6962 §2.1.1) for leaf ``index`` among ``hashes``."""
        if not 0 <= index < len(hashes):
            raise IndexError(f"leaf {index} outside a tree of {len(hashes)}")
        path: list[bytes] = []
        lo, hi = 0, len(hashes)
        while hi - lo > 1:
            k = _split(hi - lo)
            if index < lo + k:
                path.append(self._subtree(list(hashes), lo + k, hi))
                hi = lo + k
            else:
                path.append(self._subtree(list(hashes), lo, lo + k))
                lo = lo + k
        return path[::-1]

    def verify_inclusion(
        self, leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
    ) -> bool:
        """RFC 9162 §2.1.3.2 inclusion verification; False on any inconsistency."""
        if not 0 <= index < size:
            return False
        fn, sn, r = index, size - 1, leaf_hash
        for p in proof:
            if sn == 0:
                return False
            if fn & 1 or fn == sn:
                r = self.node(p, r)
                if not fn & 1:
                    while fn & 1 == 0 and fn != 0:
                        fn >>= 1
                        sn >>= 1
            else:
                r = self.node(r, p)
            fn >>= 1
            sn >>= 1
        return sn == 0 and r == root


def _split(n: int) -> int:
    """Largest power of two strictly smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


RFC6962_SHA256 = MerkleTree(
    leaf=lambda d: hashlib.sha256(b"\x00" + d).digest(),
    node=lambda left, right: hashlib.sha256(b"\x01" + left + right).digest(),
    empty=hashlib.sha256(b"").digest(),
)
