"""Recording an FSDP2 run: what each rank contributes, and how the main process joins it.

Under FSDP2 (``fully_shard``, accelerate's FSDP plugin with ``fsdp_version: 2``) every trainable
parameter and its optimizer state is a ``DTensor`` split on dim 0 over the ranks. No process holds
a whole tensor, and none is gathered: each rank writes its own shard files (checkpoint; anchor
params and optimizer) under the trace directory and sends, at the step's sync, the
:class:`~aftune_hf.sharded_digest.Pieces` of its shards (32-byte subtree values plus < 2 KiB of
boundary bytes per tensor). The main process joins them into the *standard* tensor digests
(:mod:`aftune_hf.sharded_digest`), so the chain, the anchor digest and the verifier are those of an
unsharded run; only the files are per rank (docs/FORMAT.md §4).

Example:
    >>> shards = RankShards("runs/trace", rank=0, world=2)                       # doctest: +SKIP
    >>> payload = shards.step(12, params, checkpoint=True, optimizer=None)       # doctest: +SKIP
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import digest as D
from . import sharded_digest as S
from .errors import RecorderError
from .trace import anchor_files, checkpoint_files
from .trace.writer import write_rank_file


def layout_problems(params: Mapping[str, Any], world: int) -> list[str]:
    """Why these trainable parameters are not FSDP2 dim-0 shards over ``world`` ranks ([] if they are)."""
    from torch.distributed.tensor import DTensor, Shard

    out = []
    for name, p in params.items():
        if not isinstance(p, DTensor):
            out.append(f"{name} is not a DTensor shard ({type(p).__name__})")
        elif tuple(p.placements) != (Shard(0),) or p.device_mesh.ndim != 1 or p.device_mesh.size() != world:
            out.append(f"{name} is placed {tuple(p.placements)} on a mesh of {tuple(p.device_mesh.shape)}; "
                       f"only a dim-0 shard over the {world} ranks (FSDP2's default) is recorded")  # fmt: skip
    return out


def _local(tensors: Mapping[str, Any], rank: int, world: int) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Each tensor's local part and its first row; a plain (replicated) tensor is rank 0's alone to hash."""
    from torch.distributed.tensor import DTensor

    local, first = {}, {}
    for name, t in tensors.items():
        if isinstance(t, DTensor):
            part = t.to_local().detach()
            a, b = S.shard_rows(int(t.shape[0]), world, rank)
            if tuple(part.shape) != (b - a, *t.shape[1:]):
                raise RecorderError("unsupported_sharding", f"{name}: rank {rank} holds {tuple(part.shape)}, the dim-0 "
                                    f"split of {tuple(t.shape)} gives {(b - a, *t.shape[1:])}")  # fmt: skip
            local[name], first[name] = part, a
        elif t.dim() == 0:  # replicated (the optimizer's step counters): every rank stores it, rank 0 hashes it
            local[name], first[name] = t.detach(), 0
        else:
            raise RecorderError("unsupported_sharding", f"{name} {tuple(t.shape)} is neither a dim-0 shard nor a "
                                "0-dim value; only those are recorded in an FSDP run")  # fmt: skip
    return local, first


def rank_pieces(tensors: Mapping[str, Any], rank: int, world: int) -> tuple[bytes, dict[str, torch.Tensor]]:
    """This rank's encoded :class:`~aftune_hf.sharded_digest.Pieces` of ``tensors`` and their local parts."""
    local, first = _local(tensors, rank, world)
    hashed = {n: t for n, t in local.items() if not (t.dim() == 0 and rank)}
    return S.encode(S.local_pieces(hashed, S.full_shapes(tensors), first)), local


def sharded_state_digest(tensors: Mapping[str, Any], rank: int, world: int, device: Any = "cpu") -> bytes:
    """:func:`~aftune_hf.digest.state_digest` of FSDP2 shards, on every rank: a collective (each rank
    sends its pieces, every rank joins them); no tensor is gathered. The verifier's FSDP replay uses it.

    Example:
        >>> sharded_state_digest(trainable_params(model), rank, world)    # doctest: +SKIP
    """
    from .dist import all_gather_bytes

    blob, _ = rank_pieces(tensors, rank, world)
    return _joined("tensors", all_gather_bytes(blob, device), S.full_shapes(tensors))


class RankShards:
    """One rank's side of recording an FSDP2 run (every rank, the main process too)."""

    def __init__(self, trace_dir: str | Path, rank: int, world: int) -> None:
        self.root, self.rank, self.world = Path(trace_dir), rank, world
        self.full: dict[str, dict[str, tuple[torch.dtype, tuple[int, ...]]]] = {}

    @classmethod
    def for_run(cls, contract: Any, params: Mapping[str, Any], trace_dir: str | Path, rank: int, world: int) -> RankShards:
        """This rank's recorder side, if the run is the contract's FSDP2 layout (every trainable
        parameter a dim-0 shard over the ``world`` ranks); else fail closed (``unsupported_sharding``)."""
        if contract.shards == 1:
            why = ("FSDP over one process is not recorded; train without it" if contract.trainer_args.get("fsdp") else
                   "the contract does not declare FSDP (trainer_args.fsdp with training.world_size); record the job it describes")
            raise RecorderError("unsupported_sharding", f"the trainable parameters are shards (FSDP or DeepSpeed ZeRO-3): {why}")
        if problems := layout_problems(params, world):
            raise RecorderError("unsupported_sharding", f"the contract declares FSDP over {world} ranks, but "
                                f"{len(problems)} trainable parameters are not recorded that way: " + "; ".join(problems[:3])
                                + " (FSDP2 with fsdp_version: 2 is; FSDP1 and ZeRO-3 are not: docs/SCALING.md)")  # fmt: skip
        return cls(trace_dir, rank, world)

    def _pieces(self, kind: str, tensors: Mapping[str, Any]) -> tuple[bytes, dict[str, torch.Tensor]]:
        self.full[kind] = S.full_shapes(tensors)
        blob, local = rank_pieces(tensors, self.rank, self.world)
        return struct.pack("<Q", len(blob)) + blob, local

    def step(self, step: int, params: Mapping[str, Any], *, checkpoint: bool, optimizer: Mapping[str, Any] | None) -> bytes:
        """Hash this rank's shards and write its files of ``step`` (durable before this returns, so
        before the main process can commit the step); returns its pieces for the sync.

        ``optimizer``: the encoded optimizer tensors (an anchor step), else None.
        """
        state, local = self._pieces("params", params)
        host = {n: t.cpu() for n, t in local.items()} if checkpoint or optimizer is not None else {}
        if checkpoint:
            write_rank_file(self.root, checkpoint_files(step, self.world)[self.rank], host)
        if optimizer is None:
            return state + struct.pack("<Q", 0)
        opt, opt_local = self._pieces("optimizer", optimizer)
        write_rank_file(self.root, anchor_files(step, "params", self.world)[self.rank], host)
        write_rank_file(self.root, anchor_files(step, "optimizer", self.world)[self.rank], {n: t.cpu() for n, t in opt_local.items()})
        return state + opt

    @staticmethod
    def split(rest: list[bytes]) -> tuple[list[list[bytes]], list[bytes]]:
        """Every rank's payload cut into its (params, optimizer) pieces and what it carried after them."""
        sections, tails = [], []
        for blob in rest:
            parts, at = [], 0
            for _ in range(2):
                (n,) = struct.unpack("<Q", blob[at : at + 8])
                parts.append(blob[at + 8 : at + 8 + n])
                at += 8 + n
            sections.append(parts)
            tails.append(blob[at:])
        return sections, tails

    @staticmethod
    def join(sections: list[list[bytes]], full: Mapping[str, Mapping[str, Any]]) -> tuple[bytes, bytes | None]:
        """On the main process: the params and (at an anchor step) optimizer state digests joined from
        every rank's pieces (:meth:`split`); ``full``: the tensors' dtypes and global shapes (:attr:`full`)."""
        state = _joined("params", [s[0] for s in sections], full["params"])
        optimizer = _joined("optimizer", [s[1] for s in sections], full["optimizer"]) if sections[0][1] else None
        return state, optimizer


def _joined(kind: str, blobs: list[bytes], full: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> bytes:
    ranks = [S.decode(b) for b in blobs]
    names = sorted(full)
    try:
        digests = S.join_digests([(*full[n], [r[n] for r in ranks if n in r]) for n in names])
    except ValueError as e:
        raise RecorderError("unsupported_sharding", f"{kind}: the ranks' shards do not make the tensors: {e}") from None
    return D.named_digest(dict(zip(names, digests)), D.STATE_TREE)
