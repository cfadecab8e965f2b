"""Run by tests/test_fsdp.py under `accelerate launch` (two CPU processes on gloo): record an FSDP2 run.

    accelerate launch --multi_gpu --num_processes 2 ... tests/fsdp_record.py CONTRACT TRACE [--nudge-rank R]

accelerate runs FSDP on CPU processes only with tests/fsdp_cpu.py (it treats FSDP as GPU-only).
``--nudge-rank R``: after the optimizer step of step 2, rank R adds 1e-2 to its shard of one
weight (a provider who edits the weights); the recorder commits what the weights are.
``--stop-at S``: every rank stops training at the end of step S (a crash; the trace stays open).
``--plain``: no recorder (scripts/bench_fsdp.py). Prints ``train_runtime S`` on rank 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aftune_hf import AuditCallback  # noqa: E402
from aftune_hf.contract import load_contract  # noqa: E402
from aftune_hf.dist import end_processes  # noqa: E402
from aftune_hf.errors import AftuneError  # noqa: E402
from aftune_hf.recipes.causal_lm import build  # noqa: E402
from tests import fsdp_cpu  # noqa: E402


class Nudge(transformers.TrainerCallback):
    rank, stop_at = -1, -1

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.stop_at:
            raise SystemExit(5)
        if args.process_index == self.rank and state.global_step == 2:
            p = dict(model.named_parameters())["model.layers.0.mlp.down_proj.weight"]
            with torch.no_grad():
                p.to_local().add_(1e-2)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("contract")
    ap.add_argument("trace")
    ap.add_argument("--nudge-rank", type=int, default=-1)
    ap.add_argument("--stop-at", type=int, default=-1)
    ap.add_argument("--plain", action="store_true")
    a = ap.parse_args()
    fsdp_cpu.enable()
    contract = load_contract(a.contract)
    parts = build(contract, str(Path(a.trace).parent / "out"), disable_tqdm=True, logging_steps=1000, use_cpu=True)
    Nudge.rank, Nudge.stop_at = a.nudge_rank, a.stop_at
    audit = [] if a.plain else [AuditCallback(contract, a.trace)]
    trainer = transformers.Trainer(**parts.trainer_kwargs(), callbacks=[Nudge(), *audit])
    assert trainer.args.world_size >= 2 and trainer.is_fsdp_enabled, "not a real FSDP run"
    try:
        out = trainer.train()
    except AftuneError as e:
        print(f"rank {trainer.args.process_index} stopped: {e.code} | {e}", flush=True)
        return 3
    if trainer.args.process_index == 0:
        print(f"train_runtime {out.metrics['train_runtime']:.4f}", flush=True)
    print(f"rank {trainer.args.process_index} done", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    end_processes()
    raise SystemExit(code)
