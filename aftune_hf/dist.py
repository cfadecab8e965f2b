"""What the processes of a multi-process (DDP) run exchange, on torch.distributed (the group
accelerate set up): one all-gather per step of each rank's status, loss and micro-batch digests,
plus its RNG state at anchor steps.

Only tensors cross processes (no pickled objects): bytes are sent as uint8 tensors, padded to the
longest, after an all-gather of their lengths. On NCCL the tensors live on the process's device.

Example:
    >>> all_gather_bytes(b"abc")          # one process: just itself
    [b'abc']
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from typing import Any

import torch

from .errors import ProviderFault, RecorderError
from .trace import Anchor


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def end_processes() -> None:
    """End a multi-process (gloo/NCCL) script cleanly: free what still holds the process group
    (call it after the Trainer and its DDP-wrapped model are out of scope), then destroy it.

    A group still alive at interpreter exit is torn down during finalisation, where a joinable
    C++ thread aborts the process ("terminate called without an active exception", SIGABRT) in
    about 1 of 11 exits of a 2-process gloo DDP run here; ``destroy_process_group()`` alone does not
    help while a DDP module still references the group (docs/SCALING.md).

    Example:
        >>> def main(): ...; trainer.train()      # doctest: +SKIP
        >>> main(); end_processes()               # doctest: +SKIP
    """
    import gc

    import torch.distributed as dist

    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def all_gather_bytes(payload: bytes, device: Any = "cpu") -> list[bytes]:
    """Every process's ``payload``, in rank order, on every process."""
    import torch.distributed as dist

    rank, size = world()
    if size == 1:
        return [payload]
    n = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(lengths, n)
    longest = max(int(x) for x in lengths)
    buf = torch.zeros(longest, dtype=torch.uint8, device=device)
    if payload:
        buf[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    parts = [torch.zeros_like(buf) for _ in range(size)]
    dist.all_gather(parts, buf)
    return [bytes(p[: int(k)].cpu().numpy().tobytes()) for p, k in zip(parts, lengths)]


OK, PROVIDER_FAULT, OTHER_ERROR = 0, 1, 2  # a rank's status at a sync point


def exchange(payload: bytes, error: BaseException | None, *, world: int, device: Any) -> tuple[list[bytes], list[int]]:
    """All-gather ``payload`` with this rank's status (OK, or how ``error`` failed it):
    every rank's payload and status, in rank order."""
    if world == 1:
        return [payload], [OK if error is None else OTHER_ERROR]
    status = OK if error is None else PROVIDER_FAULT if isinstance(error, ProviderFault) else OTHER_ERROR
    parts = all_gather_bytes(bytes([status]) + payload, device)
    return [p[1:] for p in parts], [p[0] for p in parts]


def sync_ranks(payload: bytes, error: BaseException | None, *, world: int, device: Any) -> list[bytes]:
    """:func:`exchange` for the recorder: if any rank failed, every rank raises (the failing one
    its own error, after this call)."""
    parts, statuses = exchange(payload, error, world=world, device=device)
    failed = [r for r, s in enumerate(statuses) if s != OK]
    if error is None and failed:
        raise RecorderError("rank_failed", f"recording failed on rank {failed[0]}; every rank stops")
    return parts


def pack_step(fields: dict[str, Any]) -> bytes:
    """This rank's share of a step for the all-gather: ``u64(n) || f64 loss || micro-batch digests``."""
    mine = struct.pack("<d", fields["loss"]) + b"".join(fields["batches"][0])
    return struct.pack("<Q", len(mine)) + mine


def merge_steps(fields: dict[str, Any], parts: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
    """Every rank's micro-batches (rank order) and the loss summed over ranks, from the gathered
    :func:`pack_step` parts; also returns what each part carried after its step share."""
    shares, rest = [], []
    for p in parts:
        (n,) = struct.unpack("<Q", p[:8])
        shares.append(p[8 : 8 + n])
        rest.append(p[8 + n :])
    batches = [[m[i : i + 32] for i in range(8, len(m), 32)] for m in shares]
    loss = math.fsum(struct.unpack("<d", m[:8])[0] for m in shares)
    return {**fields, "batches": batches, "loss": loss}, rest


def rank_rng_bytes(world: int) -> bytes:
    """This process's RNG state as bytes (JSON meta + safetensors), for the main process's anchor."""
    if world == 1:
        return b""
    from safetensors.torch import save

    from .live import rng_states
    from .statecodec import encode_rng

    tensors, meta = encode_rng(rng_states())
    blob = json.dumps(meta, sort_keys=True).encode()
    return struct.pack("<Q", len(blob)) + blob + save(tensors)


def anchor_with_ranks(anchor: Anchor, rngs: list[bytes]) -> Anchor:
    """The anchor with every rank's RNG state (meta ``rng`` a list per rank, tensors ``rank{r}.*``);
    unchanged for one process."""
    if len(rngs) <= 1:
        return anchor
    from safetensors.torch import load

    tensors, metas = {}, []
    for r, blob in enumerate(rngs):
        (n,) = struct.unpack("<Q", blob[:8])
        metas.append(json.loads(blob[8 : 8 + n]))
        tensors.update({f"rank{r}.{k}": v for k, v in load(blob[8 + n :]).items()})
    return dataclasses.replace(anchor, rng=tensors, meta={**anchor.meta, "rng": metas})


__all__ = ["OK", "OTHER_ERROR", "PROVIDER_FAULT", "all_gather_bytes", "anchor_with_ranks", "end_processes", "exchange",
           "merge_steps", "pack_step", "rank_rng_bytes", "sync_ranks", "world"]
