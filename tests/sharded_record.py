"""Run by tests/test_callback.py in a child process: a Trainer whose model is sharded with FSDP2's
``fully_shard`` (a one-process gloo group: every parameter becomes a DTensor) must be refused by
the recorder before anything is written. Prints ``REFUSED <code>`` and exits 3 when it is.

    python tests/sharded_record.py CONTRACT TRACE
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist
import transformers
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aftune_hf import AuditCallback  # noqa: E402
from aftune_hf.contract import load_contract  # noqa: E402
from aftune_hf.errors import RecorderError  # noqa: E402
from aftune_hf.recipes.causal_lm import build  # noqa: E402


def main() -> int:
    contract = load_contract(sys.argv[1])
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        parts = build(contract, str(Path(sys.argv[2]).parent / "out"), disable_tqdm=True)
        fully_shard(parts.model)
        trainer = transformers.Trainer(**parts.trainer_kwargs(), callbacks=[AuditCallback(contract, sys.argv[2])])
        try:
            trainer.train()
        except RecorderError as e:
            print(f"REFUSED {e.code} {e}", flush=True)
            return 3
        return 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
