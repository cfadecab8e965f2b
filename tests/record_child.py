"""Child process for the crash tests: record a contract's run, optionally resuming.

    python tests/record_child.py CONTRACT TRACE OUTPUT_DIR [--resume] [--sleep S]

Prints ``STEP n`` after each committed step (flushed), saves a Trainer checkpoint every step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import transformers

from aftune_hf import AuditCallback
from aftune_hf.contract import load_contract
from aftune_hf.recipes.causal_lm import build


class Pace(transformers.TrainerCallback):
    def __init__(self, sleep: float, report=None) -> None:
        self.sleep = sleep
        self.report = report or (lambda step: print(f"STEP {step}", flush=True))

    def on_step_end(self, args, state, control, **kwargs):
        self.report(state.global_step)
        time.sleep(self.sleep)


def last_complete_checkpoint(out: Path) -> str | None:
    """Newest checkpoint-N whose Trainer files are all there (the Trainer does not save atomically)."""
    done = [p for p in out.glob("checkpoint-*") if (p / "trainer_state.json").exists() and (p / "rng_state.pth").exists()]
    return str(max(done, key=lambda p: int(p.name.split("-")[1]))) if done else None


def run(contract_path: str, trace: str, out: str, resume: bool = False, sleep: float = 0.0, report=None) -> None:
    """Record (or resume recording) the contract's run; ``report(step)`` after every committed step."""
    contract = load_contract(contract_path)
    parts = build(contract, out, save_strategy="steps", save_steps=1, disable_tqdm=True, logging_steps=100)
    trainer = transformers.Trainer(**parts.trainer_kwargs(), callbacks=[AuditCallback(contract, trace), Pace(sleep, report)])
    ckpt = last_complete_checkpoint(Path(out)) if resume else None
    trainer.train(resume_from_checkpoint=ckpt)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("contract")
    ap.add_argument("trace")
    ap.add_argument("out")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--sleep", type=float, default=0.0)
    a = ap.parse_args()
    run(a.contract, a.trace, a.out, a.resume, a.sleep)
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
