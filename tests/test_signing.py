"""Signed roots (issue 16): DSSE envelopes with an in-toto statement, Ed25519 via securesystemslib.
The Hub part uses the real huggingface_hub client against tests/hub_server.py (a local HTTP
server standing in for the Hub: no network here)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest
import transformers

from aftune_hf import AuditCallback
from aftune_hf.attest import SIGNATURE, write_keypair
from aftune_hf.contract import load_contract
from aftune_hf.recipes.causal_lm import build
from aftune_hf.verify import verify_trace
from tests.conftest import REPO, record_tiny
from tests.hub_server import FakeHub

pytestmark = pytest.mark.slow
NONCE = "5151515151515151"


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "aftune_hf", *map(str, args)], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    p = _cli("keygen", d / "provider.key")
    assert p.returncode == 0 and "key id" in p.stdout, p.stderr
    assert oct((d / "provider.key").stat().st_mode & 0o777) == "0o600"
    write_keypair(d / "other.key")
    return d / "provider.key", d / "other.key"


@pytest.fixture(scope="module")
def signed(tmp_path_factory, base_model_dir, keys):
    """A trace the recorder signed at the end of training: (contract path, trace)."""
    work = tmp_path_factory.mktemp("signed")
    contract_path, _ = record_tiny(work, base_model_dir, steps=4, anchor_every=2, windows=2)
    contract = load_contract(contract_path)
    parts = build(contract, str(work / "o2"), disable_tqdm=True, logging_steps=1000)
    cb = AuditCallback(contract, work / "signed-trace", signing_key=keys[0])
    transformers.Trainer(**parts.trainer_kwargs(), callbacks=[cb]).train()
    return contract_path, work / "signed-trace", work / "trace"


def _edit_statement(trace, change):
    env = json.loads((trace / SIGNATURE).read_text())
    stmt = json.loads(base64.b64decode(env["payload"]))
    change(stmt)
    env["payload"] = base64.b64encode(json.dumps(stmt).encode()).decode()
    (trace / SIGNATURE).write_text(json.dumps(env))


def test_signed_trace_verifies_with_the_pinned_key_only(signed, keys, tmp_path):
    import shutil

    contract, trace, unsigned = signed
    pub, other = f"{keys[0]}.pub", f"{keys[1]}.pub"
    assert verify_trace(trace, contract, nonce=NONCE, signer=pub).verdict == "PASS"
    assert verify_trace(trace, contract, nonce=NONCE).verdict == "PASS"  # the envelope is outside the root
    cases = {
        "signature_missing": lambda t: (t / SIGNATURE).unlink(),
        "signature_invalid": lambda t: _edit_statement(t, lambda s: s["predicate"].update(num_steps=4)),  # re-encoded: bytes differ
        "signature_invalid ": lambda t: (t / SIGNATURE).write_text('{"payload": "x", "payloadType": 1}'),
        "signature_invalid  ": lambda t: (t / SIGNATURE).write_bytes(b"{" * 70000),
    }
    for i, (code, damage) in enumerate(cases.items()):
        t = tmp_path / f"t{i}"
        shutil.copytree(trace, t)
        damage(t)
        r = verify_trace(t, contract, nonce=NONCE, signer=pub)
        assert r.verdict == "FAIL" and r.failures[0].code == code.strip(), (code, r.summary())
    r = verify_trace(trace, contract, nonce=NONCE, signer=other)
    assert r.verdict == "FAIL" and r.failures[0].code == "signature_invalid"
    # a valid signature by the right key, over another trace's root, does not transfer
    p = _cli("sign", unsigned, "--key", keys[0])
    assert p.returncode == 0, p.stderr
    t = tmp_path / "swapped"
    shutil.copytree(trace, t)
    shutil.copy(unsigned / SIGNATURE, t / SIGNATURE)
    r = verify_trace(t, contract, nonce=NONCE, signer=pub)
    assert r.verdict == "FAIL" and r.failures[0].code == "signature_mismatch" and "subject" in r.failures[0].reason
    p = _cli("verify", trace, "--contract", contract, "--nonce", NONCE, "--signer", other, "--quiet")
    assert p.returncode == 1 and "signature_invalid" in p.stdout
    p = _cli("verify", trace, "--contract", contract, "--nonce", NONCE, "--signer", tmp_path / "nope.pub", "--quiet")
    assert p.returncode == 2 and "invalid_key" in p.stdout + p.stderr  # the client's own key file: ERROR


def test_push_signs_with_repo_and_commit_and_hf_uri_verifies(signed, keys, tmp_path):
    from aftune_hf.hub import push_trace

    contract, trace, _ = signed
    fake = FakeHub()
    endpoint = fake.start()
    try:
        p = _cli("push", trace, "me/signed", "--endpoint", endpoint, "--sign", keys[0], "--json")
        assert p.returncode == 0, p.stderr[-2000:]
        result = json.loads(p.stdout)
        env = json.loads((trace / SIGNATURE).read_text())
        pred = json.loads(base64.b64decode(env["payload"]))["predicate"]
        assert pred["repo"] == "me/signed" and len(pred["commit"]) == 40 and pred["commit"] != result["commit_sha"]
        assert verify_trace(result["uri"], contract, nonce=NONCE, endpoint=endpoint, signer=f"{keys[0]}.pub").verdict == "PASS"
        with pytest.raises(Exception, match="invalid_repo_id"):
            push_trace(trace, "not a repo id!", endpoint=endpoint)
    finally:
        fake.stop()


def test_inference_log_root_is_signed_for_a_contract(base_model_dir, keys, tmp_path):
    from tests.test_inference import client_calls, serve, served_model

    from aftune_hf.verify_inference import verify_inference

    contract, trace = record_tiny(tmp_path, base_model_dir, steps=4, anchor_every=2, inference_calls=2)
    audited = (contract, trace, tmp_path)
    call = serve(served_model(audited), tmp_path / "log")
    calls = client_calls(tmp_path, call)
    p = _cli("sign", tmp_path / "log", "--key", keys[0])
    assert p.returncode == 2 and "--contract" in p.stderr  # a log root names no contract
    assert _cli("sign", tmp_path / "log", "--key", keys[0], "--contract", contract).returncode == 0
    kw = dict(trace=trace, calls=calls)
    assert verify_inference(tmp_path / "log", contract, signer=f"{keys[0]}.pub", **kw).verdict == "PASS"
    r = verify_inference(tmp_path / "log", contract, signer=f"{keys[1]}.pub", **kw)
    assert r.verdict == "FAIL" and r.failures[0].code == "signature_invalid"
    (tmp_path / "log" / SIGNATURE).unlink()
    r = verify_inference(tmp_path / "log", contract, signer=f"{keys[0]}.pub", **kw)
    assert r.verdict == "FAIL" and r.failures[0].code == "signature_missing"
