"""Run by tests/test_ddp.py under `accelerate launch` (two CPU processes on gloo): record a DDP run.

    accelerate launch --multi_gpu --num_processes 2 ... tests/ddp_record.py CONTRACT TRACE [--poison-rank R] [--fail-rank R]

``--poison-rank R``: rank R trains on a replaced micro-batch at step 2 (the provider swaps one
rank's data; the recorder commits what was really fed). ``--fail-rank R``: rank R's recorder
fails at step 2; every rank must stop (no hang).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aftune_hf import AuditCallback  # noqa: E402
from aftune_hf.contract import load_contract  # noqa: E402
from aftune_hf.errors import AftuneError, RecorderError  # noqa: E402
from aftune_hf.recipes.causal_lm import build  # noqa: E402


class PoisonOneRank(transformers.Trainer):
    rank_to_poison = -1

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.args.process_index == self.rank_to_poison and self.state.global_step + 1 == 2:
            inputs = {**inputs, "input_ids": inputs["input_ids"].flip(0)}  # same shapes, other rows
        return super().training_step(model, inputs, num_items_in_batch)


class FailingCallback(AuditCallback):
    fail_rank = -1

    def observe(self, state, model, **kw):
        if self.rank == self.fail_rank and state.global_step == 2:
            raise RecorderError("write_failed", "injected failure on this rank")
        return super().observe(state, model, **kw)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("contract")
    ap.add_argument("trace")
    ap.add_argument("--poison-rank", type=int, default=-1)
    ap.add_argument("--fail-rank", type=int, default=-1)
    a = ap.parse_args()
    contract = load_contract(a.contract)
    parts = build(contract, str(Path(a.trace).parent / "out"), disable_tqdm=True, logging_steps=1000, use_cpu=True)
    PoisonOneRank.rank_to_poison, FailingCallback.fail_rank = a.poison_rank, a.fail_rank
    trainer = PoisonOneRank(**parts.trainer_kwargs(), callbacks=[FailingCallback(contract, a.trace)])
    assert trainer.args.world_size == 2, "not a real multi-process run"
    try:
        trainer.train()
    except AftuneError as e:
        print(f"rank {trainer.args.process_index} stopped: {e.code} | {e}", flush=True)
        return 3
    print(f"rank {trainer.args.process_index} done", flush=True)
    return 0


def run() -> int:
    """main() (the Trainer and its DDP model are freed when it returns), then end_processes():
    without it about 1 in 11 exits of a 2-process run abort with SIGABRT (issue 16)."""
    from aftune_hf.dist import end_processes

    code = main()
    end_processes()
    return code


if __name__ == "__main__":
    raise SystemExit(run())
