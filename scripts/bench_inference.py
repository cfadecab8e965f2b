"""Committed inference: recording overhead, commitment size, verification cost -- side by side.

    python scripts/bench_inference.py [--hidden 512 --layers 6 --new-tokens 128 --batch 4 --repeats 5] [--device cuda]

On one Llama-style model (built from a config), in interleaved rounds: plain ``generate`` and the
wrapped one, greedy and sampled (their order alternating), then the teacher-forced check of the
sampled call just made, timed against that call's generation (the speed-up is the median of the
rounds' ratios). The activation commitment bytes per 32 generated tokens are read from the log.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from benchkit import bench_model, emit, parser

from aftune_hf.generate import wrap_generate
from aftune_hf.recipes.tokenizer import byte_tokenizer
from aftune_hf.trace.inference import InferenceLogReader
from aftune_hf.verify import fastmath
from aftune_hf.verify.tokens import check_call

PROMPTS = ["### Instruction:\nWhat is the opposite of hot?\n### Response:\n", "Spell the word river backwards.",
           "Which day comes after Monday?", "Write the number 7 in words."]  # fmt: skip


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="where generation and verification run (e.g. cuda)")
    a = ap.parse_args()
    transformers.logging.set_verbosity_error()
    work = Path(tempfile.mkdtemp(prefix="aftune-bench-inference-"))
    bench_model(work, a.hidden, a.layers)
    plain_model = transformers.AutoModelForCausalLM.from_pretrained(work / "base").eval().to(a.device)
    wrapped = wrap_generate(transformers.AutoModelForCausalLM.from_pretrained(work / "base").eval().to(a.device), work / "log")
    tok = byte_tokenizer(padding_side="left")
    enc = tok((PROMPTS * a.batch)[: a.batch], return_tensors="pt", padding=True).to(a.device)
    # no EOS: every row generates exactly new_tokens
    settings = {"greedy": dict(do_sample=False), "sampled": dict(do_sample=True, temperature=0.8, top_p=0.95)}
    times: dict[str, list[float]] = {f"{k} {m}": [] for k in settings for m in ("plain", "recorded")}
    checks, speedups, onednn_generate = [], [], []

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        if a.device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for r in range(a.repeats):  # one round: each generation once (order alternating), then the check of its call
        for name, kw in settings.items():
            pair = [("plain", plain_model), ("recorded", wrapped)]
            for kind, model in pair if r % 2 == 0 else pair[::-1]:
                times[f"{name} {kind}"].append(timed(lambda: model.generate(**enc, max_new_tokens=a.new_tokens,
                                                                          min_new_tokens=a.new_tokens, **kw)))  # fmt: skip
        wrapped.aftune_log.publish()
        reader = InferenceLogReader(work / "log")
        entry = reader.check_integrity().entries[-1]  # the sampled call just made
        tensors = reader.call_tensors(entry)
        results: list = []
        checks.append(timed(lambda: results.extend(check_call(plain_model, entry.record, tensors, 1e-4))))
        assert all(res.ok for res in results), [res.detail for res in results]
        speedups.append(times["sampled recorded"][-1] / checks[-1])
        if a.device == "cpu" and fastmath.available():  # the same generation on the verifier's linear kernel, for reference
            with fastmath.OneDnnLinear(), torch.inference_mode():
                onednn_generate.append(timed(lambda: plain_model.generate(**enc, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                                                                           **settings["sampled"])))  # fmt: skip
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {name: med[f"{name} recorded"] / med[f"{name} plain"] for name in settings}
    for name in settings:
        print(f"{name:8} generate of {a.batch}x{a.new_tokens} tokens: plain {med[f'{name} plain']:.3f} s, "
              f"recorded {med[f'{name} recorded']:.3f} s, ratio {ratios[name]:.3f}")  # fmt: skip
    integrity = reader.check_integrity()
    entry = integrity.entries[-1]
    tensors = reader.call_tensors(entry)
    act = sum(tensors[f"act_value.{r}"].numel() * tensors[f"act_value.{r}"].element_size() for r in range(entry.record["rows"]))
    tokens = sum(tensors[f"output.{r}"].numel() for r in range(entry.record["rows"]))
    files = sum(p.stat().st_size for p in (work / "log").rglob("*") if p.is_file())
    print(f"activation commitment: {act / tokens * 32:.0f} bytes per 32 generated tokens "
          f"(TOPLOC: 258); whole log {files / (tokens * len(integrity.entries)) * 32:.0f} bytes per 32 tokens "
          f"including tokens, records and roots")  # fmt: skip
    speedup = statistics.median(speedups)
    print(f"verification of one sampled call ({a.batch} rows x {a.new_tokens} tokens): median {statistics.median(checks):.3f} s "
          f"vs its generation {med['sampled recorded']:.3f} s; per round (generation / its check) "
          + " ".join(f"{x:.1f}" for x in speedups) + f" -> median {speedup:.1f}x faster (teacher-forced pass + token checks)")  # fmt: skip
    if onednn_generate:
        onednn_speedups = [g / c for g, c in zip(onednn_generate, checks)]
        print(f"for reference, plain sampled generate with its linear layers on oneDNN too (as the check runs them): median "
              f"{statistics.median(onednn_generate):.3f} s, {statistics.median(onednn_speedups):.1f}x its check")  # fmt: skip
    print(f"model: hidden {a.hidden}, {a.layers} layers, {sum(p.numel() for p in plain_model.parameters()) / 1e6:.1f} M "
          f"parameters; torch threads {torch.get_num_threads()}")  # fmt: skip
    emit(a.json, {"device": a.device, "inference": {"record_ratio_greedy": ratios["greedy"], "record_ratio_sampled": ratios["sampled"],
                                "bytes_per_32_tokens": act / tokens * 32, "verify_speedup": speedup, "batch": a.batch}})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
