"""Honest replay noise vs the smallest meaningful attacks, in tolerance mode.

    python scripts/tolerance_gap.py [--steps 12]

Records an honest LoRA trace and cheated ones (one step each: lr x0.99, lr x0.9, update
skipped, one tensor nudged by 1e-6 / 1e-5), replays them here, and prints the relative L2
distance at the cheated step next to the honest noise measured on another CPU kernel path
(``ATEN_CPU_CAPABILITY=default``, in a subprocess via ``aftune calibrate``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import transformers
import yaml

from aftune_hf import AuditCallback
from aftune_hf.artifacts import dataset_digest, model_dir_digest
from aftune_hf.contract import load_contract
from aftune_hf.recipes.causal_lm import DEFAULT_DATASET, build, make_base_model
from aftune_hf.verify import verify_trace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from scripts.attacks.cheats import Cheat  # noqa: E402

ATTACKS = [("lr", 0.99, "lr x0.99 at one step"), ("lr", 0.9, "lr x0.9 at one step"),
           ("skip_update", None, "one update skipped"), ("nudge", 1e-6, "one tensor +1e-6 after a step"),
           ("nudge", 1e-5, "one tensor +1e-5 after a step")]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    a = ap.parse_args()
    transformers.logging.set_verbosity_error()
    work = Path(tempfile.mkdtemp(prefix="aftune-gap-"))
    make_base_model(work / "base")
    data = yaml.safe_load((REPO / "configs" / "tiny-lora.yaml").read_text())
    data["base_model"] = {"path": str(work / "base"), "digest": model_dir_digest(work / "base").hex()}
    data["dataset"] = {"path": str(DEFAULT_DATASET), "digest": dataset_digest(DEFAULT_DATASET).hex()}
    data["training"]["max_steps"] = a.steps
    data["audit"].update(mode="tolerance", tolerance=1e-6, checkpoint_every=1)
    path = work / "contract.yaml"
    path.write_text(yaml.safe_dump(data))
    contract = load_contract(path)

    def record(name: str, cheat=None) -> Path:
        parts = build(contract, str(work / name / "out"), disable_tqdm=True, logging_steps=10**6)
        callbacks = ([cheat] if cheat else []) + [AuditCallback(contract, work / name / "trace")]
        transformers.Trainer(**parts.trainer_kwargs(), callbacks=callbacks).train()
        return work / name / "trace"

    honest = record("honest")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "aftune_hf", "calibrate", str(honest), "--contract", str(path), "--json"],
                       capture_output=True, text=True, env=env, check=True)  # fmt: skip
    noise = json.loads(p.stdout)
    print(f"honest noise (replayed with ATEN_CPU_CAPABILITY=default): max {noise['max']:.2e}, "
          f"median {noise['median']:.2e} over {len(noise['per_step'])} steps")  # fmt: skip
    print(f"{'attack':34} {'distance at the cheated step':>30} {'x honest max':>14}")
    step = a.steps // 2 + 1
    for kind, amount, label in ATTACKS:
        trace = record(f"{kind}-{amount}", Cheat(kind, step, amount))
        report = verify_trace(trace, contract, nonce="0000000000000000", windows=10**6, data_check=False)
        d = next(c.distance for w in report.windows for c in w.steps if c.step == step)
        print(f"{label:34} {d:>30.2e} {d / max(noise['max'], 1e-30):>14.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
