"""Layer-block cells: the verifier's cell check against a whole training step, memory and time side by side.

    python scripts/bench_cells.py [--hidden 512 --layers 6 --vocab 32000 --batch 8 --block 3 --repeats 3]

A Llama-style base model (vocab ``--vocab``) is fine-tuned for 2 steps under a contract with one
layer per block (``audit.layer_blocks: [0, 1, ..., layers]``), recorded by the real
``AuditCallback``; the provider opens cell (step 2, ``--block``) with ``aftune_hf.cells.open_cells``.
Then, in fresh child processes (peak resident memory is each one's own), alternating:

* ``step``: what one training step of the whole model costs -- load the base model, then the
  step's micro-batches forward and backward, gradient clipping, one AdamW step;
* ``cell``: the verifier's whole cell check, ``aftune_hf.cells.check_cells`` -- read and
  authenticate the opening against the chain, build the block alone, re-execute forward and
  backward from the opened boundaries, clip with the committed norm, the block's AdamW update,
  compare every digest.

Reports each one's peak memory above its baseline (imports, the chain, the batch), the time of the
work itself (the model load excluded from ``step``), their ratios, and the block's share of the
parameters and of a step's matrix FLOPs (``aftune_hf.cells.plan.block_costs``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchkit import REPO, bench_contract, emit, parser


def record(a, work: Path) -> Path:
    from aftune_hf.cells.opening import Cell, open_cells
    from aftune_hf.contract import load_contract
    from aftune_hf.recipes.causal_lm import make_base_model

    sys.path.insert(0, str(REPO))
    from tests import cellkit

    base = work / "base"
    digest = make_base_model(base, hidden_size=a.hidden, intermediate_size=4 * a.hidden, num_hidden_layers=a.layers,
                             num_attention_heads=8, num_key_value_heads=4, vocab_size=a.vocab)  # fmt: skip
    path = bench_contract(work, "tiny-full", base, digest, steps=2, name="cells", anchor_every=2, checkpoint_every=1,
                          layer_blocks=list(range(a.layers + 1)),
                          sections={"training": {"per_device_train_batch_size": a.batch, "gradient_accumulation_steps": 1}})  # fmt: skip
    c = load_contract(path)
    cellkit.record(path, work / "trace")
    open_cells(c, work / "trace", [Cell(2, a.block)], work / "open")
    return path


def _config(c):
    import transformers

    config = transformers.AutoConfig.from_pretrained(c.resolve(c.base_model.path))
    config.attention_dropout = float(c.recipe_args.get("dropout", 0.0))  # as the recipe builds it
    config._attn_implementation = c.training.attn_implementation
    return config


def _status(key: str) -> int:
    """A /proc/self/status figure in kB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(key)


def _reset_peak() -> int:
    """Reset this process's peak resident memory to its current one (Linux clear_refs 5); return it (kB).
    (``ru_maxrss`` would not do: a child starts with its parent's peak.)"""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def child(a) -> dict[str, float]:
    """One measurement in this process: peak resident memory above the baseline, seconds."""
    from aftune_hf.cells.check import check_cells
    from aftune_hf.cells.opening import Cell, step_file
    from aftune_hf.contract import load_contract
    from aftune_hf.safeio import parse_safetensors

    work = Path(a.work)
    c = load_contract(work / "cells.yaml")
    steps = {int(k): v for k, v in json.loads((work / "steps.json").read_text()).items()}  # the parent checked the chain
    batch = parse_safetensors((work / "open" / step_file(2, batch=True)).read_bytes(), path="batch")
    config = _config(c)
    import transformers
    from accelerate import init_empty_weights

    from aftune_hf.cells.check import _training_arguments

    with init_empty_weights():  # one-time setup before the baseline, on both sides: the model code imported,
        transformers.AutoModelForCausalLM.from_config(config)  # the contract's TrainingArguments and optimizer class
    transformers.Trainer.get_optimizer_cls_and_kwargs(_training_arguments(c))
    base = _reset_peak()
    if a.kind == "step":
        model = transformers.AutoModelForCausalLM.from_pretrained(c.resolve(c.base_model.path), config=config).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        t = time.perf_counter()
        kwargs = {k.split("/", 1)[1]: v for k, v in batch.items()}
        model(**kwargs).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    else:
        t = time.perf_counter()
        (result,) = check_cells(c, steps, [Cell(2, a.block)], work / "open", config)
        if not result.ok:
            raise SystemExit(f"the honest cell failed: {result.detail}")
    secs = time.perf_counter() - t
    return {"peak_mb": (_status("VmHWM") - base) / 1024, "seconds": secs}


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=3, help="the challenged block (one layer each; 0 and the last also hold embeddings / head)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kind", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--keep", help="keep the recorded job in this directory")
    a = ap.parse_args()
    if not 0 <= a.block < a.layers:
        ap.error(f"--block: 0 .. {a.layers - 1}")
    if a.kind:
        if a.profile:
            import cProfile

            cProfile.runctx("child(a)", globals(), {"a": a, "child": child}, sort="cumtime")
            return 0
        print(json.dumps(child(a)))
        return 0
    from aftune_hf.cells.plan import block_costs
    from aftune_hf.contract import load_contract

    with tempfile.TemporaryDirectory(prefix="aftune-bench-cells-") as tmp:
        work = Path(a.keep or tmp)
        t = time.perf_counter()
        path = record(a, work)
        print(f"recorded 2 steps and opened cell (2, {a.block}) in {time.perf_counter() - t:.1f} s")
        from aftune_hf.trace import TraceReader

        steps = {s: dict(r) for s, r in TraceReader(work / "trace").check_integrity().steps().items()}
        (work / "steps.json").write_text(json.dumps(steps))
        shares, sizes = block_costs(_config(load_contract(path)), list(range(a.layers + 1)))
        args = [sys.executable, __file__, "--hidden", str(a.hidden), "--layers", str(a.layers), "--vocab", str(a.vocab),
                "--batch", str(a.batch), "--block", str(a.block), "--work", str(work)]  # fmt: skip
        runs: dict[str, list[dict[str, float]]] = {"step": [], "cell": []}
        for r in range(a.repeats):
            for kind in ("step", "cell") if r % 2 == 0 else ("cell", "step"):
                out = subprocess.run([*args, "--kind", kind], check=True, capture_output=True, text=True).stdout
                runs[kind].append(json.loads(out.strip().splitlines()[-1]))
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("peak_mb", "seconds")} for k, v in runs.items()}
    total = sum(sizes) / 16
    print(f"model: hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}: {total / 1e6:.1f} M parameters; batch {a.batch} "
          f"(the bundled dataset's rows, padded to a multiple of 8); cell = step 2, block {a.block}; torch threads {torch.get_num_threads()}")  # fmt: skip
    param_share = sizes[a.block] / sum(sizes)
    print(f"block share: {param_share:.3f} of the parameters, {shares[a.block]:.3f} of a step's matrix FLOPs")
    for k in runs:
        print(f"{k:4}: peak memory above baseline median {med[k]['peak_mb']:.0f} MB, time median {med[k]['seconds']:.3f} s "
              f"(rounds: " + " ".join(f"{x['seconds']:.3f}" for x in runs[k]) + ")")  # fmt: skip
    mem, sec = med["cell"]["peak_mb"] / med["step"]["peak_mb"], med["cell"]["seconds"] / med["step"]["seconds"]
    print(f"cell check / whole step: memory {mem:.3f}, time {sec:.3f}")
    emit(a.json, {"cells": {"memory_ratio": mem, "time_ratio": sec, "param_share": param_share, "flop_share": shares[a.block]}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
