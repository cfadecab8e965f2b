"""Layer-block cells: a cell's verifier memory and compute against a whole training step, side by side.

    python scripts/bench_cells.py [--hidden 512 --layers 6 --vocab 32000 --batch 4 --seq 256 --block 1 --repeats 5]

One Llama-style model built from a config. In each round, in fresh child processes (so peak
resident memory is each one's own): a whole forward/backward step of the model, and the
re-execution of one block of ``--block`` layers (layer 1 onwards) from its boundary tensors with
only that block in memory (``aftune_hf.cells.execute``). Reports each one's peak memory above
the process's baseline (imports, inputs) and time, and the ratios; the block's share of the
model's parameters and of a step's matrix FLOPs is printed beside them.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import transformers

from benchkit import emit, parser


def config(a) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden, num_hidden_layers=a.layers,
                                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=max(a.seq, 64))  # fmt: skip


def child(a) -> dict[str, float]:
    """One measurement in this process: peak resident memory above the baseline, seconds."""
    from aftune_hf.cells.execute import block_model, run_block

    torch.manual_seed(0)
    cfg = config(a)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq))
    x, g = torch.randn(a.batch, a.seq, a.hidden), torch.randn(a.batch, a.seq, a.hidden)
    if a.kind == "cell":  # the block's weights alone, made before the baseline (the verifier opens only these)
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        weights = {}
        for i in range(1, 1 + a.block):
            layer = LlamaDecoderLayer(cfg, i)
            weights.update({f"model.layers.{i}.{n}": p.detach() for n, p in layer.named_parameters()})
            del layer
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if a.kind == "step":
        model = transformers.LlamaForCausalLM(cfg)
        t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
    else:
        model = block_model(cfg, 1, 1 + a.block, weights)
        t = time.perf_counter()
        run_block(model, 1, 1 + a.block, x, g)
    secs = time.perf_counter() - t
    return {"peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024, "seconds": secs}


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--block", type=int, default=1, help="layers in the block")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kind", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if not 1 <= a.block <= a.layers - 2:
        ap.error(f"--block: 1 .. {a.layers - 2} layers (a middle block from layer 1; the first and last also hold embeddings / head)")
    if a.kind:
        print(json.dumps(child(a)))
        return 0
    args = [sys.executable, __file__, "--hidden", str(a.hidden), "--layers", str(a.layers), "--vocab", str(a.vocab),
            "--batch", str(a.batch), "--seq", str(a.seq), "--block", str(a.block)]  # fmt: skip
    runs: dict[str, list[dict[str, float]]] = {"step": [], "cell": []}
    for r in range(a.repeats):
        for kind in ("step", "cell") if r % 2 == 0 else ("cell", "step"):
            out = subprocess.run([*args, "--kind", kind], check=True, capture_output=True, text=True).stdout
            runs[kind].append(json.loads(out.strip().splitlines()[-1]))
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("peak_mb", "seconds")} for k, v in runs.items()}
    cfg = config(a)
    h, f, v, s = a.hidden, 4 * a.hidden, a.vocab, a.seq
    layer_params = 2 * h * h + 2 * h * (h // 2) + 3 * h * f + 2 * h  # q, o; k, v (4 of 8 heads); mlp; norms
    total = a.layers * layer_params + 2 * v * h + h
    attn = 4 * a.batch * s * s * h  # QK^T and AV, forward
    step_flops = 3 * (2 * a.batch * s * (total - v * h) + a.layers * attn)  # forward + backward (2x), embedding lookup free
    cell_flops = 3 * a.block * (2 * a.batch * s * layer_params + attn)
    print(f"model: hidden {h}, {a.layers} layers, vocab {v}: {total / 1e6:.1f} M parameters; batch {a.batch} x {s} tokens; "
          f"block of {a.block} layer(s); torch threads {torch.get_num_threads()}; {cfg.model_type}")  # fmt: skip
    print(f"block share: {a.block * layer_params / total:.3f} of the parameters, {cell_flops / step_flops:.3f} of a step's FLOPs")
    for k in runs:
        print(f"{k:4}: peak memory above baseline median {med[k]['peak_mb']:.0f} MB, time median {med[k]['seconds']:.3f} s "
              f"(rounds: " + " ".join(f"{x['seconds']:.3f}" for x in runs[k]) + ")")  # fmt: skip
    mem, sec = med["cell"]["peak_mb"] / med["step"]["peak_mb"], med["cell"]["seconds"] / med["step"]["seconds"]
    print(f"cell / step: memory {mem:.3f}, time {sec:.3f}")
    emit(a.json, {"cells": {"memory_ratio": mem, "time_ratio": sec, "param_share": a.block * layer_params / total,
                            "flop_share": cell_flops / step_flops}})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
