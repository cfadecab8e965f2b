"""The aftune_hf story on a tiny model, end to end, in about a minute on a laptop CPU.

    python scripts/demo.py [--contract configs/tiny-lora.yaml] [--out runs/demo]

1. create the tiny base model the contract names (deterministic; its digest must match);
2. the provider fine-tunes it with an ordinary ``transformers.Trainer`` + ``AuditCallback``;
3. the client draws a nonce and verifies: structure, every step's data, re-executed windows -> PASS;
4. a provider edits one committed checkpoint after the fact: the verifier FAILs, naming the step.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import safetensors.torch
import transformers

from aftune_hf import AuditCallback
from aftune_hf.artifacts import check_artifacts, model_dir_digest
from aftune_hf.contract import load_contract
from aftune_hf.recipes.causal_lm import build, make_base_model
from aftune_hf.trace import checkpoint_path
from aftune_hf.verify import verify_trace

REPO = Path(__file__).resolve().parents[1]


def say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contract", default=str(REPO / "configs" / "tiny-lora.yaml"))
    ap.add_argument("--out", default=str(REPO / "runs" / "demo"))
    a = ap.parse_args()
    transformers.logging.set_verbosity_error()
    contract = load_contract(a.contract)
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)

    base = contract.resolve(contract.base_model.path)
    if not (base / "config.json").exists() or model_dir_digest(base).hex() != contract.base_model.digest:
        say(f"creating the base model in {base}")
        make_base_model(base)
    check_artifacts(contract)
    say(f"contract {contract.name}: digest {contract.digest_hex()}")

    say(f"provider: {contract.training.max_steps} audited optimizer steps with transformers.Trainer + AuditCallback")
    parts = build(contract, str(out / "trainer"), disable_tqdm=True, logging_steps=1000)
    callback = AuditCallback(contract, out / "trace")
    result = transformers.Trainer(**parts.trainer_kwargs(), callbacks=[callback]).train()
    print(f"trained: loss {result.training_loss:.4f}; trace root {callback.root['trace_root']}")

    nonce = os.urandom(8).hex()
    say(f"client: verify with a fresh nonce {nonce} (structure, all-steps data check, re-executed windows)")
    report = verify_trace(out / "trace", contract, nonce=nonce, model=out / "trace" / checkpoint_path(contract.training.max_steps))
    print(report.summary())
    if not report.ok:
        return 1

    step = contract.training.max_steps // 2
    say(f"a cheating provider nudges the weights in the committed checkpoint of step {step}")
    victim = out / "trace" / checkpoint_path(step)
    tensors = safetensors.torch.load_file(victim)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * 1.001
    safetensors.torch.save_file(tensors, victim, metadata={"format": "pt"})
    report = verify_trace(out / "trace", contract, nonce=nonce)
    print(report.summary())
    caught = report.verdict == "FAIL" and report.failures[0].step == step
    print(f"\n{'caught at step %d' % step if caught else 'NOT CAUGHT: this is a bug'}")
    return 0 if caught else 1


if __name__ == "__main__":
    sys.exit(main())
