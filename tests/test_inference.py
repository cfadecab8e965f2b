"""Committed inference: honest greedy and sampled calls PASS; every cheat FAILs with the call named."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

import aftune_hf.generate as G
from aftune_hf.contract import load_contract
from aftune_hf.generate import wrap_generate
from aftune_hf.recipes.causal_lm import build, make_base_model
from aftune_hf.trace.inference import InferenceLogReader, call_path
from aftune_hf.verify_inference import verify_inference
from tests.conftest import record_tiny

pytestmark = pytest.mark.slow
PROMPTS = ["### Instruction:\nWhat is 2 plus 3?\n### Response:\n", "Hello", "Spell the word apple backwards."]
NEW = 64


@pytest.fixture(scope="module")
def audited(tmp_path_factory, base_model_dir):
    """A recorded LoRA fine-tune: (contract path, trace, work dir)."""
    work = tmp_path_factory.mktemp("inference")
    path, trace = record_tiny(work, base_model_dir, steps=6, anchor_every=3, inference_calls=4)
    return path, trace, work


def served_model(audited, kind="tuned"):
    """What a provider serves: the fine-tuned model, or something cheaper."""
    contract_path, trace, work = audited
    contract = load_contract(contract_path)
    model = build(contract, str(work / "serve")).model.eval()
    if kind != "base":
        from aftune_hf.trace import TraceReader

        reader = TraceReader(trace)
        final = reader.checkpoint(contract.training.max_steps)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in final:
                    p.copy_(final[n])
    if kind == "other_seed":
        other = make_base_model(work / f"other-{id(model)}", seed=1)
        assert other != contract.base_model.digest
        donor = transformers.AutoModelForCausalLM.from_pretrained(work / f"other-{id(model)}").state_dict()
        with torch.no_grad():
            for n, p in model.get_base_model().named_parameters():
                if "lora_" not in n:
                    p.copy_(donor[n.replace(".base_layer.", ".")])
    if kind in ("bf16", "int8"):
        with torch.no_grad():
            for p in model.parameters():
                if kind == "bf16":
                    p.copy_(p.to(torch.bfloat16).float())
                else:
                    scale = p.abs().max().clamp_min(1e-12) / 127
                    p.copy_((p / scale).round().clamp(-127, 127) * scale)
    return model


def serve(model, log, *, sample=False, lie_weights_of=None, **gen):
    tok = build.__globals__["byte_tokenizer"](padding_side="left")
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    if lie_weights_of is not None:  # the provider claims the audited weights while serving others
        claimed = G.served_weights(lie_weights_of)
        real = G.served_weights
        G.served_weights = lambda m: claimed
        try:
            wrap_generate(model, log)
        finally:
            G.served_weights = real
    else:
        wrap_generate(model, log)
    kwargs = dict(max_new_tokens=NEW, do_sample=sample, **gen)
    out = model.generate(**enc, **kwargs)
    model.aftune_log.publish()
    model.aftune_log.close()
    rows = []
    for r in range(len(PROMPTS)):
        prompt = enc["input_ids"][r][enc["attention_mask"][r].bool()].tolist()
        output = out[r, enc["input_ids"].shape[1]:].tolist()
        if tok.eos_token_id in output:
            output = output[: output.index(tok.eos_token_id) + 1]
        rows.append({"prompt": prompt, "output": output})
    return {"call": 1, "rows": rows, "config": {k: v for k, v in gen.items()}}


def client_calls(tmp_path, *calls):
    path = tmp_path / "calls.json"
    path.write_text(json.dumps({"calls": list(calls)}))
    return path


@pytest.mark.parametrize("sample,gen", [(False, {}), (True, {"temperature": 0.7, "top_p": 0.9}), (True, {"top_k": 20})])
def test_honest_calls_pass(audited, tmp_path, sample, gen, monkeypatch):
    contract, trace, _ = audited
    # a fixed sampling seed: with a fresh random one, whether any row runs to NEW tokens before EOS
    # was chance (CI failed once with 56 of 64)
    monkeypatch.setattr(G.os, "urandom", lambda n: bytes(range(7, 7 + n)))
    call = serve(served_model(audited), tmp_path / "log", sample=sample, **gen)
    report = verify_inference(tmp_path / "log", contract, trace=trace, calls=client_calls(tmp_path, call))
    assert report.verdict == "PASS", report.summary()
    assert len(report.calls) == 3 and all(c.tokens >= 1 for c in report.calls)
    assert max(c.tokens for c in report.calls) == NEW
    log = InferenceLogReader(tmp_path / "log").check_integrity()
    assert log.num_calls == 1
    # and without the client's copy: calls sampled from H(log root || nonce)
    assert verify_inference(tmp_path / "log", contract, trace=trace, nonce="0102010201020102").verdict == "PASS"


def test_wrapped_greedy_output_is_unchanged(audited, tmp_path):
    model = served_model(audited)
    tok = build.__globals__["byte_tokenizer"](padding_side="left")
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    plain = model.generate(**enc, max_new_tokens=NEW, do_sample=False)
    wrap_generate(model, tmp_path / "log")
    assert torch.equal(model.generate(**enc, max_new_tokens=NEW, do_sample=False), plain)


@pytest.mark.parametrize("kind", ["other_seed", "base", "bf16", "int8"])
@pytest.mark.parametrize("lie", [False, True])
def test_other_model_served_fails(audited, tmp_path, kind, lie):
    contract, trace, _ = audited
    honest = served_model(audited) if lie else None
    serve(served_model(audited, kind), tmp_path / "log", lie_weights_of=honest)
    report = verify_inference(tmp_path / "log", contract, trace=trace, nonce="0303030303030303")
    assert report.verdict == "FAIL", report.summary()
    f = report.failures[0]
    assert f.step == 1  # the call is named
    assert f.code == ("call_mismatch" if lie else "weights_mismatch"), report.summary()
    if lie:
        assert "activations differ" in f.reason


@pytest.mark.parametrize("setting,asked,used", [("temperature", 0.7, 1.0), ("top_p", 0.8, 1.0)])
def test_other_decoding_settings_fail(audited, tmp_path, setting, asked, used, monkeypatch):
    contract, trace, _ = audited
    # honest record, but not what the client asked for
    call = serve(served_model(audited), tmp_path / "a", sample=True, **{setting: used})
    call["config"] = {setting: asked}
    report = verify_inference(tmp_path / "a", contract, trace=trace, calls=client_calls(tmp_path, call))
    assert report.verdict == "FAIL" and report.failures[0].code == "client_mismatch" and setting in report.failures[0].reason
    # lying record: it says what the client asked, the tokens were sampled with something else
    real_init = G._InverseCdfSampler.__init__

    def cheat(self, config, seed, prompt_len):
        real_init(self, {**config, setting: G.D.encode_float(used) if used != 1.0 else None}, seed, prompt_len)

    monkeypatch.setattr(G._InverseCdfSampler, "__init__", cheat)
    serve(served_model(audited), tmp_path / "b", sample=True, **{setting: asked})
    report = verify_inference(tmp_path / "b", contract, trace=trace, nonce="0404040404040404")
    assert report.verdict == "FAIL" and report.failures[0].code == "call_mismatch", report.summary()
    assert "does not follow from the committed sampling" in report.failures[0].reason


def test_changed_prompt_and_edited_output_fail(audited, tmp_path):
    contract, trace, _ = audited
    call = serve(served_model(audited), tmp_path / "log")
    changed = copy.deepcopy(call)
    changed["rows"][1]["prompt"][0] += 1  # the provider served another prompt than the client sent
    report = verify_inference(tmp_path / "log", contract, trace=trace, calls=client_calls(tmp_path, changed))
    assert report.verdict == "FAIL" and "prompt differs" in report.failures[0].reason and report.failures[0].step == 1
    edited = copy.deepcopy(call)
    edited["rows"][0]["output"][5] ^= 1  # the client received another output than the log commits
    report = verify_inference(tmp_path / "log", contract, trace=trace, calls=client_calls(tmp_path, edited))
    assert report.verdict == "FAIL" and "output differs" in report.failures[0].reason


def test_log_committing_an_edited_token_fails(audited, tmp_path):
    """The provider edits an output token and commits the edit consistently: the greedy check catches it."""
    contract, trace, _ = audited
    model = served_model(audited)
    original = model.generate

    def edited(*a, **k):
        out = original(*a, **k)
        out = out.clone()
        out[0, -NEW + 10] = (out[0, -NEW + 10] + 1) % 256
        return out

    model.generate = edited
    serve(model, tmp_path / "log")
    report = verify_inference(tmp_path / "log", contract, trace=trace, nonce="0505050505050505")
    assert report.verdict == "FAIL" and report.failures[0].step == 1
    assert "token 10" in report.failures[0].reason or "activations" in report.failures[0].reason


@pytest.mark.parametrize("token", [10**6, -3])
def test_a_committed_token_outside_the_vocabulary_fails_not_crashes(audited, tmp_path, token):
    """Ids the model cannot embed are the provider's fault: FAIL naming the call, never a crash or ERROR."""
    contract, trace, _ = audited
    model = served_model(audited)
    original = model.generate

    def edited(*a, **k):
        out = original(*a, **k).clone()
        out[1, -5] = token
        return out

    model.generate = edited
    serve(model, tmp_path / "log")
    report = verify_inference(tmp_path / "log", contract, trace=trace, nonce="0505050505050505")
    assert report.verdict == "FAIL" and report.failures[0].step == 1, report.summary()
    assert "outside the model's vocabulary" in report.failures[0].reason


def test_tampered_log_file_fails(audited, tmp_path):
    contract, trace, _ = audited
    serve(served_model(audited), tmp_path / "log")
    f = tmp_path / "log" / call_path(1)
    import safetensors.torch

    t = safetensors.torch.load_file(f)
    t["output.0"][3] += 1
    safetensors.torch.save_file(t, f, metadata={"format": "pt"})
    report = verify_inference(tmp_path / "log", contract, trace=trace, nonce="0606060606060606")
    assert report.verdict == "FAIL" and report.failures[0].code == "hash_mismatch"


def test_unsupported_decoding_is_refused_before_generating(audited, tmp_path):
    from aftune_hf.errors import ConfigError

    model = served_model(audited)
    wrap_generate(model, tmp_path / "log")
    tok = build.__globals__["byte_tokenizer"](padding_side="left")
    with pytest.raises(ConfigError, match="num_beams"):
        model.generate(**tok(PROMPTS[:1], return_tensors="pt"), max_new_tokens=4, num_beams=2)


def test_cli_verify_inference(audited, tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    contract, trace, _ = audited
    call = serve(served_model(audited), tmp_path / "log")
    calls = client_calls(tmp_path, call)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "aftune_hf", "verify-inference", str(tmp_path / "log"), "--contract", str(contract),
            "--trace", str(trace), "--quiet"]  # fmt: skip
    p = subprocess.run([*base, "--calls", str(calls), "--device", "cpu"], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and p.stdout.startswith("PASS"), p.stdout + p.stderr[-2000:]
    call["rows"][2]["output"][0] ^= 1
    p = subprocess.run([*base, "--calls", str(client_calls(tmp_path, call))], capture_output=True, text=True, env=env)
    assert p.returncode == 1 and "output differs" in p.stdout
