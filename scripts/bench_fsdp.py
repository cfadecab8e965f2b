"""FSDP2 recording overhead on this machine: two CPU processes (gloo) under ``accelerate launch``
train the tiny Llama full fine-tune with accelerate's FSDP2 (tests/fsdp_cpu.py lets accelerate do
FSDP on CPU), without and with AuditCallback, interleaved; the Trainer's own ``train_runtime`` of
each run is compared (process start-up excluded). Tolerance-mode contract: a checkpoint every step.

    python scripts/bench_fsdp.py --rounds 3 --steps 30
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCH = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from aftune_hf.recipes.causal_lm import make_base_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_base_model(work / "model")
        data = yaml.safe_load((REPO / "configs" / "tiny-full.yaml").read_text())
        data["base_model"]["path"] = str(work / "model")
        data["dataset"]["path"] = str(REPO / "aftune_hf" / "recipes" / "data" / "tiny_instruct.jsonl")
        data["recipe_args"] = {"dropout": 0.0}
        data["training"].update(max_steps=a.steps, world_size=2)
        data["trainer_args"] = {"fsdp": True, "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
        data["audit"].update(anchor_every=10, checkpoint_every=1, mode="tolerance", tolerance=1e-4)
        contract = work / "contract.yaml"
        contract.write_text(yaml.safe_dump(data, sort_keys=False))
        env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        times: dict[str, list[float]] = {"plain": [], "recorded": []}
        for r in range(a.rounds):
            for kind in ("plain", "recorded"):
                trace = work / f"{kind}-{r}" / "trace"
                trace.parent.mkdir()
                extra = ["--plain"] if kind == "plain" else []
                p = subprocess.run([*LAUNCH, str(REPO / "tests" / "fsdp_record.py"), str(contract), str(trace), *extra],
                                   capture_output=True, text=True, env=env, cwd=trace.parent, timeout=900)  # fmt: skip
                m = re.search(r"train_runtime ([0-9.]+)", p.stdout)
                if p.returncode != 0 or not m:
                    raise SystemExit(f"{kind} run failed:\n{p.stdout}\n{p.stderr[-3000:]}")
                times[kind].append(float(m.group(1)) / a.steps * 1000)
                print(f"round {r} {kind:9s} {times[kind][-1]:.1f} ms/step", flush=True)
        plain, rec = statistics.median(times["plain"]), statistics.median(times["recorded"])
        ratios = [b / p for p, b in zip(times["plain"], times["recorded"])]
        print(f"FSDP2, 2 CPU processes, tiny Llama full FT, {a.steps} steps, checkpoint every step, anchor every 10")
        print(f"  plain {plain:.1f} ms/step, recorded {rec:.1f} ms/step: {rec / plain:.2f}x (median of {a.rounds} "
              f"interleaved rounds; per-round ratios {', '.join(f'{x:.2f}' for x in ratios)})")  # fmt: skip


if __name__ == "__main__":
    main()
