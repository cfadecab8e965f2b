"""The aftune_hf story on a tiny model, end to end, in about a minute on a laptop CPU.

    python scripts/demo.py [--contract configs/tiny-lora.yaml] [--out runs/demo]

1. create the tiny base model the contract names (deterministic; its digest must match);
2. the provider fine-tunes it with an ordinary ``transformers.Trainer`` + ``AuditCallback``;
3. the client reads the trace back and checks every commitment;
4. a provider edits one committed checkpoint after the fact: the check names the file.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import safetensors.torch
import transformers

from aftune_hf import AuditCallback
from aftune_hf.artifacts import check_artifacts, model_dir_digest
from aftune_hf.contract import load_contract
from aftune_hf.errors import ProviderFault
from aftune_hf.recipes.causal_lm import build, make_base_model
from aftune_hf.trace import TraceReader, checkpoint_path

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

    say("client: strict read of the whole trace (paths, formats, chain, Merkle root, every file digest)")
    integrity = TraceReader(out / "trace").check_integrity()
    anchors = [s for s, r in integrity.steps().items() if r["anchor"]]
    print(f"PASS  {integrity.num_steps} steps, {len(integrity.entries)} records, anchors at steps {anchors}")

    say("a cheating provider nudges the weights in one committed checkpoint after training")
    victim = out / "trace" / checkpoint_path(integrity.num_steps // 2)
    tensors = safetensors.torch.load_file(victim)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * 1.001
    safetensors.torch.save_file(tensors, victim, metadata={"format": "pt"})
    try:
        TraceReader(out / "trace").check_integrity()
    except ProviderFault as e:
        print(f"FAIL  {e}")
        return 0
    print("the tampering was not detected: this is a bug")
    return 1


if __name__ == "__main__":
    sys.exit(main())
