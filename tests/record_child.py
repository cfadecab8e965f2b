"""Child process for the crash tests: record a contract's run, optionally resuming.

    python tests/record_child.py CONTRACT TRACE OUTPUT_DIR [--resume] [--sleep S] [--kill-in POINT]

Prints ``STEP n`` after each committed step (flushed), saves a Trainer checkpoint every step.
``--resume`` is the README's command, ``train(resume_from_checkpoint=True)`` (from scratch if no
checkpoint was saved yet). ``--kill-in`` SIGKILLs the process itself at a named point of
finalisation (fault injection for points too short to hit with a timed kill; see KILL_POINTS).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import transformers
from transformers.trainer_utils import get_last_checkpoint

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


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_in(point: str) -> None:
    """Patch the writer so that the process kills itself at ``point`` of finalisation."""
    from aftune_hf import digest as D
    from aftune_hf.trace import writer as W

    write, digest, release = W.atomic_write_bytes, D.file_digest, W._Lock.release
    calls = {"n": 0}

    def atomic(path, data, *a, **k):
        name = Path(path).name
        if (point, name) in (("before-card", "README.md"), ("before-root", "root.json")):
            _die()
        if (point, name) == ("mid-root", "root.json"):  # the temp file written, not yet renamed
            from aftune_hf.safeio import stage_bytes

            stage_bytes(Path(path), data)
            _die()
        return write(path, data, *a, **k)

    def hashing(path, *a, **k):
        calls["n"] += 1
        if point == "mid-hashing" and calls["n"] == 3:
            _die()
        return digest(path, *a, **k)

    def unlock(self):
        if point == "before-unlock" and (self.path.parent / "root.json").exists():
            _die()
        return release(self)

    W.atomic_write_bytes, D.file_digest, W._Lock.release = atomic, hashing, unlock


KILL_POINTS = ("before-card", "mid-hashing", "before-root", "mid-root", "before-unlock")


def run(contract_path: str, trace: str, out: str, resume: bool = False, sleep: float = 0.0, report=None,
        kill_in: str | None = None) -> None:  # fmt: skip
    """Record (or resume recording) the contract's run; ``report(step)`` after every committed step."""
    if kill_in:
        _kill_in(kill_in)
    contract = load_contract(contract_path)
    parts = build(contract, out, save_strategy="steps", save_steps=1, disable_tqdm=True, logging_steps=100)
    trainer = transformers.Trainer(**parts.trainer_kwargs(), callbacks=[AuditCallback(contract, trace), Pace(sleep, report)])
    # the README's resume; the recorder (on_init_end) has moved torn checkpoints aside by now
    trainer.train(resume_from_checkpoint=True if resume and get_last_checkpoint(out) else None)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("contract")
    ap.add_argument("trace")
    ap.add_argument("out")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--kill-in", choices=KILL_POINTS)
    a = ap.parse_args()
    run(a.contract, a.trace, a.out, a.resume, a.sleep, kill_in=a.kill_in)
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
