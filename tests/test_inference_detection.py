"""How strong the inference checks are: honest calls never FAIL on other CPU kernel paths, and the
per-token score (aftune_hf.verify.tokens) separates honest serving from each cheaper serving of
scripts/attacks/serving.py, with the margins scripts/detection_curves.py measured (docs/INFERENCE.md)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from aftune_hf.verify.tokens import length_groups, processed_scores
from tests.conftest import REPO, record_tiny

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_honest_calls_never_fail_on_other_cpu_kernel_paths(tmp_path_factory, base_model_dir, capability):
    """Served in a child process on ``capability`` (greedy and sampled), verified here on this
    machine's default path: every call PASSes, no token is off, every token score is 0."""
    from aftune_hf.verify_inference import verify_inference

    if capability == "avx512" and torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
        pytest.skip("this CPU has no AVX-512 path")
    work = tmp_path_factory.mktemp(f"kernels-{capability}")
    contract, trace = record_tiny(work, base_model_dir, steps=4, anchor_every=2)
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, str(REPO / "tests" / "serve_child.py"), contract, trace, work / "logs"],
                       capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    served_on = p.stdout.split()[-1]
    assert capability == "default" and served_on == "DEFAULT" or capability.upper() == served_on
    for kind in ("greedy", "sampled"):
        report = verify_inference(work / "logs" / kind, contract, trace=trace, nonce="0909090909090909", num_calls=2)
        assert report.verdict == "PASS", report.summary()
        assert len(report.calls) == 4 and all(c.tokens_off == 0 and c.token_score == 0.0 for c in report.calls), report.summary()


def test_rows_are_batched_by_length_at_least_cost():
    """Padding costs as much as the tokens it pads; an extra forward pass costs the overhead."""
    assert length_groups([10, 10, 10]) == [[0, 1, 2]]
    assert length_groups([300, 40, 41], overhead=32) == [[0], [1, 2]]
    assert length_groups([300, 40, 41], overhead=1000) == [[0, 1, 2]]
    lengths = [57, 3, 190, 190, 64, 63, 5]
    groups = length_groups(lengths)
    assert sorted(r for g in groups for r in g) == list(range(len(lengths)))
    cost = sum(32 + max(lengths[r] for r in g) * len(g) for g in groups)
    assert cost <= min(32 + 190 * 7, sum(32 + x for x in lengths))


def test_vectorised_processors_equal_transformers_one_position_at_a_time():
    """processed_scores does for all positions at once what generate's processors did per step."""
    from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor

    from aftune_hf import digest as D

    g = torch.Generator().manual_seed(3)
    prompt, output = torch.randint(0, 50, (9,), generator=g), torch.randint(0, 50, (30,), generator=g)
    logits = torch.randn(30, 64, generator=g)
    cfg = {"repetition_penalty": D.encode_float(1.3), "min_new_tokens": 7, "eos_token_id": 5}
    ids = torch.cat([prompt, output])[None]
    penalty, eos = RepetitionPenaltyLogitsProcessor(1.3), MinNewTokensLengthLogitsProcessor(9, 7, 5)
    want = torch.cat([eos(ids[:, : 9 + t], penalty(ids[:, : 9 + t], logits[t : t + 1].clone())) for t in range(30)])
    assert torch.equal(processed_scores(logits, prompt, output, cfg), want)


# Per-token rates at which each serving emits a token that does not follow from the committed
# sampling (temperature 0.8, top_p 0.95), measured by scripts/detection_curves.py over 8192 tokens
# each (docs/INFERENCE.md; the honest baseline on another kernel path: 0 of 8192).
MEASURED_OFF_RATE = {"swap": 8162 / 8192, "bf16": 281 / 8192, "fp16": 157 / 8192, "int8": 578 / 8192,
                     "kv_bf16": 55 / 8192, "kv_fp16": 6 / 8192, "temperature": 1294 / 8192, "top_p": 544 / 8192}  # fmt: skip


def _lower_bound(expected: float) -> int:
    """Off tokens a serving must show at least: half the measured rate's expectation (tokens of a row
    are correlated, so the count varies more than a Poisson count: with these 16 prompts the
    temperature lie shows 240 where 8192 other tokens imply 324, 4.6 Poisson deviations below);
    none required where fewer than 8 are expected. Honest serving must show exactly 0."""
    return 0 if expected < 8 else max(1, math.floor(expected / 2))


def test_the_token_score_separates_honest_serving_from_each_cheaper_serving(tmp_path, monkeypatch):
    """16 rows x 128 sampled tokens per serving, scored with the audited model: honest serving
    scores exactly 0 on every token; each cheaper serving has at least the off tokens its measured
    rate implies, and where the token score cannot see it at this budget (fp16 KV cache: 6 in
    8192 measured) the activation commitment does. The calls' sampling seeds (``os.urandom`` in
    ``wrap_generate``) are fixed here, so the counts are the same every run (a CI run with random
    seeds drew 238 for temperature against the earlier 4-sigma Poisson bound of 251)."""
    import os

    import blake3
    import transformers

    counter = iter(range(1 << 30))
    monkeypatch.setattr(os, "urandom", lambda n: blake3.blake3(b"aftune-test-seed %d" % next(counter)).digest(length=n))

    from scripts.attacks.serving import SERVINGS, serve
    from scripts.detection_curves import audited_model, prompts, score_log

    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(audited_model(tmp_path)).eval()
    rows, new = 16, 128
    for kind in SERVINGS:
        serve(model, kind, tmp_path / kind, prompts(rows), new_tokens=new, donor=tmp_path / "donor")
        s = score_log(model, tmp_path / kind)
        off = int((~s["ok"]).sum())
        if kind == "honest":
            assert off == 0 and bool((s["score"] == 0).all()) and bool(s["act_ok"].all())
            continue
        need = _lower_bound(MEASURED_OFF_RATE[kind] * rows * new)
        assert off >= need, f"{kind}: {off} tokens off, the measured rate implies >= {need}"
        assert float(s["score"][~s["ok"]].min()) > 0 if off else True
        if need == 0:  # below the token score's reach at this budget: the activation check must see it
            assert int((~s["act_ok"]).sum()) > 0, kind
