"""Detection curves of the inference checks: how many checked tokens catch each cheaper serving.

    python scripts/detection_curves.py [--rows 64 --new-tokens 128 --json FILE]

An audited model (the tiny Llama, briefly fine-tuned on the bundled data so that its next-token
distributions are peaked like a trained model's, not uniform like a random one's) is served every
way in ``scripts/attacks/serving.py`` through the real wrapped ``generate``, claiming the audited
weights. The honest baseline is the audited model served in a child process on another CPU kernel
path (``ATEN_CPU_CAPABILITY=avx2``; the verifier runs on this machine's default): the cross-kernel
noise an honest provider on other hardware shows. Every call is then teacher-forced with the
audited model (:mod:`aftune_hf.verify.tokens`), giving per token its score (probability mass
between the audited model's choice and the served token under the committed randomness), whether
it follows from the committed decoding, and whether its activation commitment matches.

For ``k`` checked tokens (windows of ``k`` consecutive tokens, rows concatenated): the AUC of the
window's mean token score (attack vs honest baseline), the detection rate at a 1 % false-alarm
rate of that score, and the rate of windows in which the activation check fails a token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.attacks.serving import SERVINGS, serve  # noqa: E402

KS = (1, 4, 16, 64, 256, 1024)
RTOL = 1e-4  # the contract default audit.inference_rtol


def audited_model(work: Path, steps: int = 150) -> Path:
    """The tiny Llama fine-tuned ``steps`` full-FT steps on the bundled instructions (cached in ``work``)."""
    out = work / "audited"
    if (out / "config.json").exists():
        return out
    import transformers

    from aftune_hf.recipes.causal_lm import DEFAULT_DATASET, load_rows, make_base_model
    from aftune_hf.recipes.tokenizer import byte_tokenizer

    make_base_model(work / "base", hidden_size=128, intermediate_size=256, num_hidden_layers=3)
    make_base_model(work / "donor", seed=7, hidden_size=128, intermediate_size=256, num_hidden_layers=3)
    model = transformers.AutoModelForCausalLM.from_pretrained(work / "base")
    tok = byte_tokenizer(padding_side="right")
    texts = [prompt(r["instruction"]) + r["response"] for r in load_rows(DEFAULT_DATASET)]
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = [texts[(step * 16 + i) % len(texts)] for i in range(16)]
        enc = tok(batch, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out


def prompt(instruction: str) -> str:
    return f"### Instruction:\n{instruction}\n### Response:\n"


def prompts(rows: int) -> list[str]:
    from aftune_hf.recipes.causal_lm import DEFAULT_DATASET, load_rows

    data = load_rows(DEFAULT_DATASET)
    return [prompt(data[i % len(data)]["instruction"]) for i in range(rows)]


def serve_in_child(model_dir: Path, kind: str, log: Path, rows: int, new_tokens: int, sample: bool, capability: str) -> None:
    """Serve in a child process on another CPU kernel path (ATEN_CPU_CAPABILITY is read at torch import)."""
    cmd = [sys.executable, __file__, "--serve", kind, "--model", str(model_dir), "--log", str(log),
           "--rows", str(rows), "--new-tokens", str(new_tokens)] + ([] if sample else ["--greedy"])  # fmt: skip
    subprocess.run(cmd, check=True, env={**os.environ, "ATEN_CPU_CAPABILITY": capability})


def score_log(model: Any, log: Path) -> dict[str, torch.Tensor]:
    """Per token of every row of every call in ``log``, rows concatenated: ``score``, ``ok`` (follows
    from the committed decoding), ``act_ok`` (its activation commitment matches within RTOL)."""
    from aftune_hf.trace.inference import InferenceLogReader
    from aftune_hf.verify.tokens import activation_errors, processed_scores, teacher_forced, token_scores

    reader = InferenceLogReader(log)
    out: dict[str, list[torch.Tensor]] = {"score": [], "ok": [], "act_ok": []}
    for entry in reader.check_integrity().entries:
        rec, tensors = entry.record, reader.call_tensors(entry)
        seed = bytes.fromhex(rec["seed"]) if rec["seed"] else None
        for r, (h, logits) in enumerate(teacher_forced(model, tensors, rec["rows"])):
            prompt_ids, output = tensors[f"prompt.{r}"], tensors[f"output.{r}"]
            score, ok = token_scores(processed_scores(logits, prompt_ids, output, rec["config"]), prompt_ids, output,
                                     rec["config"], seed, r)  # fmt: skip
            act_ok = activation_errors(h, tensors[f"act_value.{r}"], RTOL) <= RTOL
            for key, value in (("score", score), ("ok", ok), ("act_ok", act_ok)):
                out[key].append(value)
    return {k: torch.cat(v) for k, v in out.items()}


def windows(x: torch.Tensor, k: int, n: int = 2000, seed: int = 0) -> torch.Tensor:
    """``n`` windows of ``k`` consecutive tokens (random starts), as a [n, k] tensor."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(x) - k + 1, (n,), generator=g)
    return x[starts[:, None] + torch.arange(k)[None]]


def auc(neg: torch.Tensor, pos: torch.Tensor) -> float:
    """P(pos > neg) + P(pos == neg) / 2 over all pairs (Mann-Whitney)."""
    both = torch.cat([neg, pos]).double()
    ranks = torch.empty_like(both)
    order = both.argsort()
    ranks[order] = torch.arange(1, len(both) + 1, dtype=torch.float64)
    for v in both.unique():  # average ranks of ties
        tie = both == v
        ranks[tie] = ranks[tie].mean()
    return float((ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2) / (len(neg) * len(pos)))


def curves(honest: dict[str, torch.Tensor], attack: dict[str, torch.Tensor], ks=KS) -> dict[int, dict[str, float]]:
    """Per ``k``: token-score AUC, its detection rate at 1 % false alarms, activation-check detection rate."""
    out = {}
    for k in ks:
        if k > min(len(honest["score"]), len(attack["score"])):
            continue
        h, a = windows(honest["score"], k).double().mean(1), windows(attack["score"], k, seed=1).double().mean(1)
        threshold = float(torch.quantile(h, 0.99))
        act = (~windows(attack["act_ok"], k, seed=1)).any(1).double().mean()
        out[k] = {"auc": auc(h, a), "detect_at_1pct": float((a > threshold).double().mean()), "activation_detect": float(act),
                  "honest_false_alarm_activation": float((~windows(honest["act_ok"], k)).any(1).double().mean())}  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64, help="rows served per serving (8 per call)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--greedy", action="store_true", help="greedy calls instead of sampled (T 0.8, top_p 0.95)")
    ap.add_argument("--json")
    ap.add_argument("--serve", help=argparse.SUPPRESS)  # child mode: serve one way into --log
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--log", help=argparse.SUPPRESS)
    a = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    if a.serve:
        model = transformers.AutoModelForCausalLM.from_pretrained(a.model).eval()
        serve(model, a.serve, a.log, prompts(a.rows), new_tokens=a.new_tokens, sample=not a.greedy)
        return 0
    work = Path(tempfile.mkdtemp(prefix="aftune-detection-"))
    model_dir = audited_model(work)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    kinds = [k for k in SERVINGS if not (a.greedy and k in ("temperature", "top_p"))]
    serve_in_child(model_dir, "honest", work / "log-honest-avx2", a.rows, a.new_tokens, not a.greedy, "avx2")
    baseline = score_log(model, work / "log-honest-avx2")
    results: dict[str, Any] = {}
    mode = "greedy" if a.greedy else "sampled (temperature 0.8, top_p 0.95)"
    print(f"{mode}; {a.rows} rows x {a.new_tokens} tokens per serving; baseline: honest on ATEN_CPU_CAPABILITY=avx2, "
          f"{int((~baseline['ok']).sum())} of {len(baseline['ok'])} tokens off, "
          f"{int((~baseline['act_ok']).sum())} activation mismatches")  # fmt: skip
    print("| serving | tokens off | token score AUC @ k = " + " / ".join(map(str, KS)) + " | detected at 1 % false alarms @ k | activation check detects @ k |")
    print("|---|---|---|---|---|")
    for kind in kinds:
        log = work / f"log-{kind}"
        serve(model, kind, log, prompts(a.rows), new_tokens=a.new_tokens, sample=not a.greedy, donor=work / "donor")
        scores = score_log(model, log)
        c = curves(baseline, scores)
        results[kind] = {"tokens": len(scores["ok"]), "tokens_off": int((~scores["ok"]).sum()), "curves": c}
        row = lambda key: " / ".join(f"{c[k][key]:.3f}" if k in c else "-" for k in KS)  # noqa: E731
        print(f"| {kind} | {results[kind]['tokens_off']} of {results[kind]['tokens']} | {row('auc')} | {row('detect_at_1pct')} | "
              f"{row('activation_detect')} |")  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps({"mode": mode, "rows": a.rows, "new_tokens": a.new_tokens, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
