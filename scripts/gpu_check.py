"""What needs a GPU: exact replay on CUDA, CPU<->GPU honest replay noise (tolerance calibration), bf16.

    python scripts/gpu_check.py prepare .gpu             # here, on the CPU: base model, contracts, CPU traces
    python scripts/gpu_check.py gpu .gpu --out DIR       # on the GPU machine (writes DIR/results.json, DIR/gpu_traces.tar)
    python scripts/gpu_check.py back DIR/gpu_traces.tar .gpu   # here again: replay the GPU traces on the CPU

``prepare`` writes contracts (paths relative to them, so the folder can travel) for the tiny
Llama-style model and records every tolerance contract here. ``gpu`` then (1) records each exact
contract on the GPU and verifies it there, every window (same hardware: must PASS bit for bit);
(2) calibrates the CPU-recorded traces on the GPU (the honest CPU->GPU distance); (3) records the
tolerance contracts on the GPU and calibrates them there (GPU->GPU) and packs them for ``back``,
which calibrates them on the CPU (GPU->CPU). Cross-hardware contracts have dropout 0: a GPU draws
other dropout masks than a CPU from the same seed, so only dropout-free runs can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

import transformers
from benchkit import bench_contract, machine

from aftune_hf import AuditCallback
from aftune_hf.calibrate import calibrate
from aftune_hf.contract import load_contract
from aftune_hf.recipes.causal_lm import build, make_base_model
from aftune_hf.verify import verify_trace

NO_DROPOUT = {"recipe_args": {"dropout": 0.0}}
EXACT = {  # recorded and verified on the GPU; dropout on (the CUDA generator's state is in the anchors)
    "lora-fp32": ("tiny-lora", {}),
    "full-fp32": ("tiny-full", {}),
    "lora-bf16": ("tiny-lora", {"training": {"precision": "bf16"}}),
    "full-bf16": ("tiny-full", {"training": {"precision": "bf16"}}),
}
TOLERANCE = {  # recorded on both sides, replayed on the other
    "lora-fp32-tol": ("tiny-lora", {**NO_DROPOUT, "peft": {"lora_dropout": 0.0}}),
    "full-fp32-tol": ("tiny-full", NO_DROPOUT),
    "lora-bf16-tol": ("tiny-lora", {**NO_DROPOUT, "peft": {"lora_dropout": 0.0}, "training": {"precision": "bf16"}}),
}


def record(contract_path: Path, trace: Path) -> float:
    """Train the contract with the recorder; returns seconds."""
    c = load_contract(contract_path)
    parts = build(c, str(trace.parent / f"{trace.name}-out"), disable_tqdm=True, logging_steps=10**6)
    t = time.perf_counter()
    transformers.Trainer(**parts.trainer_kwargs(), callbacks=[AuditCallback(c, trace)]).train()
    return time.perf_counter() - t


def prepare(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    digest = make_base_model(work / "base")
    for name, (kind, sections) in {**EXACT, **TOLERANCE}.items():
        audit = {"anchor_every": 4, "checkpoint_every": 1, "windows": 2}
        if name in TOLERANCE:
            audit.update(mode="tolerance", tolerance=1e-3)
        bench_contract(work, kind, work / "base", digest, steps=8, name=name, sections=sections, **audit)
    for name in TOLERANCE:
        print(f"recording {name} on the CPU: {record(work / f'{name}.yaml', work / 'cpu' / name):.1f} s", flush=True)


def on_gpu(work: Path, out: Path) -> None:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": {**machine(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none"}, "exact": {}, "cpu_to_gpu": {},
                     "gpu_to_gpu": {}}  # fmt: skip
    save = lambda: (out / "results.json").write_text(json.dumps(results, indent=2))  # noqa: E731
    gpu = work / "gpu"
    shutil.rmtree(gpu, ignore_errors=True)
    for name in EXACT:  # (1) same hardware, exact mode
        seconds = record(work / f"{name}.yaml", gpu / name)
        rep = verify_trace(gpu / name, work / f"{name}.yaml", nonce="0000000000000000", windows=10**6)
        dist = [s.distance for w in rep.windows for s in w.steps if s.distance is not None]
        results["exact"][name] = {"verdict": rep.verdict, "record_s": seconds, "max_distance": max(dist, default=None),
                                  "failures": [f"{f.code} step {f.step}: {f.reason}" for f in rep.failures][:5],
                                  "error": rep.error}  # fmt: skip
        print(f"exact on the GPU, {name}: {rep.verdict} (recorded in {seconds:.1f} s; "
              f"{len(rep.failures)} failures {results['exact'][name]['failures'][:2]})", flush=True)
        save()
    for name in TOLERANCE:  # (2) CPU-recorded, replayed here
        cal = calibrate(work / "cpu" / name, work / f"{name}.yaml", windows=None)
        results["cpu_to_gpu"][name] = {k: cal[k] for k in ("max", "median", "proposed_tolerance")}
        print(f"CPU->GPU {name}: {cal['summary']}", flush=True)
        save()
    for name in TOLERANCE:  # (3) GPU-recorded, replayed here and (later) on the CPU
        record(work / f"{name}.yaml", gpu / name)
        cal = calibrate(gpu / name, work / f"{name}.yaml", windows=None)
        results["gpu_to_gpu"][name] = {k: cal[k] for k in ("max", "median", "proposed_tolerance")}
        print(f"GPU->GPU {name}: {cal['summary']}", flush=True)
        save()
    with tarfile.open(out / "gpu_traces.tar", "w") as tar:
        for name in TOLERANCE:
            tar.add(gpu / name, arcname=name)


def back(tar_path: Path, work: Path) -> None:
    dest = work / "from_gpu"
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="data")
    for name in TOLERANCE:
        cal = calibrate(dest / name, work / f"{name}.yaml", windows=None)
        print(f"GPU->CPU {name}: {cal['summary']}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["prepare", "gpu", "back"])
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu")))
    a = ap.parse_args()
    transformers.logging.set_verbosity_error()
    if a.what == "prepare":
        prepare(a.paths[0])
    elif a.what == "gpu":
        on_gpu(a.paths[0], a.out)
    else:
        back(a.paths[0], a.paths[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
