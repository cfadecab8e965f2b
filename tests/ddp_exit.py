"""Run by tests/test_ddp.py under `accelerate launch` (two CPU processes on gloo): DDP steps and
all-gathers as a recording does, then exit -- with aftune_hf.dist.end_processes() unless
``--raw``. Prints ``rank R done``; the test counts exits that abort."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from accelerate import PartialState


def main() -> None:
    state = PartialState(cpu=True)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(64, 64))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(20):
        model(torch.randn(8, 64)).sum().backward()
        opt.step()
        opt.zero_grad()
        dist.all_gather([torch.zeros(4) for _ in range(2)], torch.ones(4))
    print(f"rank {state.process_index} done", flush=True)


if __name__ == "__main__":
    main()
    if "--raw" not in sys.argv:
        from aftune_hf.dist import end_processes

        end_processes()
