"""The few collectives a multi-process recording needs, on torch.distributed (the group accelerate set up).

Only tensors cross processes (no pickled objects): bytes are sent as uint8 tensors, padded to the
longest, after an all-gather of their lengths. On NCCL the tensors live on the process's device.

Example:
    >>> all_gather_bytes(b"abc")          # one process: just itself
    [b'abc']
"""

from __future__ import annotations

from typing import Any

import torch


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


__all__ = ["all_gather_bytes", "world"]
