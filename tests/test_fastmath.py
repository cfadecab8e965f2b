"""The verifier's fast first pass (oneDNN float32 linear layers): used, float32-accurate, never the
reason an honest call FAILs, and no cover for a cheat."""

from __future__ import annotations

import pytest
import torch
import transformers

from aftune_hf.generate import wrap_generate
from aftune_hf.recipes.tokenizer import byte_tokenizer
from aftune_hf.trace.inference import InferenceLogReader
from aftune_hf.verify import fastmath
from aftune_hf.verify.tokens import check_call, check_row, teacher_forced

pytestmark = pytest.mark.skipif(not fastmath.available(), reason="this torch build has no oneDNN")


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture
def calls(monkeypatch):
    """Counts the linear layers the fast pass routes to oneDNN; ``calls.noise`` perturbs their output."""
    seen = {"n": 0, "noise": 0.0}
    real = fastmath.onednn_linear

    def counted(x, w, b):
        seen["n"] += 1
        out = real(x, w, b)
        return out * (1 + seen["noise"]) if seen["noise"] else out

    monkeypatch.setattr(fastmath, "onednn_linear", counted)
    return seen


def test_float32_linear_layers_run_on_onednn_with_float32_accuracy(calls):
    model = tiny_llama()
    ids = torch.randint(0, 264, (3, 40))
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
        with fastmath.OneDnnLinear():
            fast = model(input_ids=ids).logits
    assert calls["n"] == 2 * 7 + 1  # q k v o gate up down per layer, and the head
    assert (fast - ref).abs().max() <= 1e-5 * ref.abs().max()
    x, w = torch.randn(5, 64), torch.randn(8, 64)
    with torch.inference_mode(), fastmath.OneDnnLinear():  # called with keywords, too
        assert torch.allclose(torch.nn.functional.linear(input=x, weight=w), x @ w.T, rtol=1e-5, atol=1e-5)
    assert calls["n"] == 2 * 7 + 2
    calls["n"] = 0
    with fastmath.OneDnnLinear():  # autograd on, or another dtype: left to torch
        model(input_ids=ids).logits.sum().backward()
        with torch.inference_mode():
            model.to(torch.bfloat16)(input_ids=ids)
    assert calls["n"] == 0


def committed_call(tmp_path, sample: bool):
    model = tiny_llama()
    wrapped = wrap_generate(tiny_llama(), tmp_path / "log")
    enc = byte_tokenizer(padding_side="left")(["Hello there", "Which day comes after Monday?"], return_tensors="pt", padding=True)
    wrapped.generate(**enc, max_new_tokens=24, min_new_tokens=24, do_sample=sample, **({"temperature": 0.8} if sample else {}))
    wrapped.aftune_log.publish()
    reader = InferenceLogReader(tmp_path / "log")
    entry = reader.check_integrity().entries[-1]
    return model, entry.record, reader.call_tensors(entry)


@pytest.mark.parametrize("sample", [False, True])
def test_a_call_the_fast_pass_rejects_is_judged_by_the_default_kernels(tmp_path, calls, sample):
    model, record, tensors = committed_call(tmp_path, sample)
    assert all(r.ok and r.token_score == 0 for r in check_call(model, record, tensors, 1e-4))
    assert calls["n"] > 0  # the fast pass ran
    calls["noise"] = 1e-3  # a fast pass that disagrees with the default kernels ...
    forward = teacher_forced(model, tensors, record["rows"], fast=True)
    assert not any(check_row(record, tensors, r, h, lg, 1e-4).ok for r, (h, lg) in enumerate(forward))
    assert all(r.ok for r in check_call(model, record, tensors, 1e-4))  # ... does not FAIL an honest call
    forged = dict(tensors)
    forged["act_value.1"] = tensors["act_value.1"] * (1 + 1e-3)
    calls["noise"] = 0.0
    assert [r.ok for r in check_call(model, record, forged, 1e-4)] == [True, False]  # nor hide a cheat
