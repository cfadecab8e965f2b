"""Hub push and pull with the real huggingface_hub client against tests/hub_server.py.

There is no network here: tests/hub_server.py is a small local HTTP server on 127.0.0.1 that
stands in for the Hugging Face Hub (create repo, commit, list and download at a revision).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import transformers
import yaml

from aftune_hf import AuditCallback
from aftune_hf.contract import load_contract
from aftune_hf.hub import pull, push_trace
from aftune_hf.recipes.causal_lm import build
from aftune_hf.trace import checkpoint_path
from aftune_hf.verify import verify_trace
from tests.conftest import REPO, record_tiny

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, base_model_dir):
    return record_tiny(tmp_path_factory.mktemp("hub"), base_model_dir, steps=6, anchor_every=3, windows=2)


def test_push_pull_verify_round_trip(hub, recorded, tmp_path):
    fake, endpoint = hub
    contract, trace = recorded
    result = push_trace(trace, "me/round-trip", endpoint=endpoint, token="hf_test")
    assert len(result.commit_sha) == 40 and result.trace_root
    report = verify_trace(result.uri, contract, nonce="aaaaaaaaaaaaaaaa", endpoint=endpoint)
    assert report.verdict == "PASS", report.summary()
    assert report.trace_root == result.trace_root
    # only that revision was downloaded
    downloads = [r for r in fake.requests if "/resolve/" in r]
    assert downloads and all(f"/resolve/{result.commit_sha}/" in r for r in downloads)
    pulled = pull("me/round-trip", result.commit_sha, tmp_path / "p", endpoint=endpoint)
    card = (pulled / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "aftune_hf" and {"aftune", "audit-trace"} <= set(front["tags"])
    assert result.trace_root in (pulled / "root.json").read_text()


def test_tampering_on_the_endpoint_after_push_is_detected(hub, recorded):
    fake, endpoint = hub
    contract, trace = recorded
    result = push_trace(trace, "me/tampered", endpoint=endpoint)
    data = (trace / checkpoint_path(3)).read_bytes()
    fake.tamper("me/tampered", result.commit_sha, checkpoint_path(3), data[:-4] + b"\x00\x00\x80\x3f")
    report = verify_trace(result.uri, contract, nonce="abababababababab", endpoint=endpoint)
    assert report.verdict == "FAIL" and report.failures[0].check == "structure", report.summary()
    assert report.failures[0].step == 3


def test_new_commit_does_not_change_the_pinned_revision(hub, recorded, tmp_path):
    fake, endpoint = hub
    contract, trace = recorded
    first = push_trace(trace, "me/moving", endpoint=endpoint)
    edited = tmp_path / "edited"
    import shutil

    shutil.copytree(trace, edited)
    (edited / "README.md").write_text("rewritten after the client pinned the revision")
    second = push_trace(edited, "me/moving", endpoint=endpoint, check=False)
    assert second.commit_sha != first.commit_sha
    assert verify_trace(first.uri, contract, nonce="acacacacacacacac", endpoint=endpoint, windows=1).verdict == "PASS"
    assert verify_trace(second.uri, contract, nonce="acacacacacacacac", endpoint=endpoint, windows=1).verdict == "FAIL"


def test_missing_repository_or_revision_is_fail(hub, recorded):
    _, endpoint = hub
    contract, _ = recorded
    report = verify_trace("hf://me/never-pushed@" + "0" * 40, contract, nonce="adadadadadadadad", endpoint=endpoint)
    assert report.verdict == "FAIL" and report.failures[0].code == "not_served"


def _cli(*args, **env):
    e = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-m", "aftune_hf", *map(str, args)], capture_output=True, text=True, env=e)


def test_cli_push_and_verify_and_unreachable_endpoint(hub, recorded):
    _, endpoint = hub
    contract, trace = recorded
    p = _cli("push", trace, "me/cli", "--endpoint", endpoint)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = dict(line.split(None, 1) for line in p.stdout.splitlines() if line.startswith(("trace", "commit")))
    sha = lines["commit"].split()[-1]
    uri = f"hf://me/cli@{sha}"
    assert uri in p.stdout
    q = _cli("push", trace, "me/cli", "--endpoint", endpoint, "--json")  # same files: no new commit
    assert q.returncode == 0 and json.loads(q.stdout)["trace_root"] == lines["trace"].split()[-1], q.stderr[-2000:]
    p = _cli("verify", uri, "--contract", contract, "--nonce", "aeaeaeaeaeaeaeae", "--endpoint", endpoint, "--quiet")
    assert p.returncode == 0 and p.stdout.startswith("PASS"), p.stdout + p.stderr[-2000:]
    assert "downloading trace" not in p.stderr
    p = _cli("verify", uri, "--contract", contract, "--nonce", "aeaeaeaeaeaeaeae", "--endpoint", endpoint, "--no-data-check")
    assert p.returncode == 0 and "downloading trace" in p.stderr and "replaying windows" in p.stderr, p.stderr[-2000:]
    p = _cli("verify", uri, "--contract", contract, "--nonce", "aeaeaeaeaeaeaeae", "--endpoint", endpoint, "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["source"] == uri and "downloading trace" not in p.stderr
    # a dead endpoint: ERROR (exit 2), never PASS
    p = _cli("verify", uri, "--contract", contract, "--nonce", "aeaeaeaeaeaeaeae", "--endpoint", "http://127.0.0.1:9", "--quiet",
             HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")  # fmt: skip
    assert p.returncode == 2 and p.stdout.startswith("ERROR"), p.stdout + p.stderr[-2000:]
    # a branch name is not a pinned revision: usage error
    p = _cli("verify", "hf://me/cli@main", "--contract", contract, "--endpoint", endpoint, "--quiet")
    assert p.returncode == 2


def test_push_during_training(hub, recorded, tmp_path):
    fake, endpoint = hub
    contract_path, _ = recorded
    contract = load_contract(contract_path)
    parts = build(contract, str(tmp_path / "o"), disable_tqdm=True, logging_steps=1000)
    cb = AuditCallback(contract, tmp_path / "trace", push_to_hub="me/live", hub_endpoint=endpoint)
    transformers.Trainer(**parts.trainer_kwargs(), callbacks=[cb]).train()
    commits = [r for r in fake.requests if r == "POST /api/models/me/live/commit/main"]
    assert len(commits) >= 2  # at least one anchor push during training and the final one
    assert cb.push_result.trace_root == cb.root["trace_root"]
    assert verify_trace(cb.push_result.uri, contract, nonce="afafafafafafafaf", endpoint=endpoint).verdict == "PASS"


def test_inference_log_push_and_verify(hub, recorded, tmp_path):
    from aftune_hf.generate import wrap_generate
    from aftune_hf.recipes.tokenizer import byte_tokenizer
    from aftune_hf.trace import TraceReader
    from aftune_hf.verify_inference import verify_inference

    _, endpoint = hub
    contract_path, trace = recorded
    contract = load_contract(contract_path)
    model = build(contract, str(tmp_path / "o")).model.eval()
    final = TraceReader(trace).checkpoint(6)
    import torch

    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in final:
                p.copy_(final[n])
    wrap_generate(model, tmp_path / "log")
    model.generate(**byte_tokenizer(padding_side="left")(["hi", "there!"], return_tensors="pt", padding=True), max_new_tokens=8)
    model.aftune_log.publish()
    model.aftune_log.close()
    log = push_trace(tmp_path / "log", "me/log", endpoint=endpoint)
    tr = push_trace(trace, "me/log-trace", endpoint=endpoint)
    report = verify_inference(log.uri, contract, trace=tr.uri, nonce="0101010101010101", endpoint=endpoint)
    assert report.verdict == "PASS", report.summary()


@pytest.mark.parametrize("mode", ["extra", "endless", "drip"])
def test_hostile_server_is_bounded_by_listing_and_deadline(hub, recorded, tmp_path, monkeypatch, mode):
    """A server that sends more than the listed size (FAIL, stopped at the listed size), streams
    without end (FAIL), or drips a byte at a time (ERROR once the deadline passes) -- never unbounded."""
    import time

    import aftune_hf.hub_pull as H

    fake, endpoint = hub
    contract, trace = recorded
    result = push_trace(trace, f"me/hostile-{mode}", endpoint=endpoint, token="hf_test")
    monkeypatch.setattr(H, "BASE_DEADLINE", 3.0)
    fake.misbehave = {"chain.jsonl": mode}
    try:
        t0 = time.monotonic()
        report = verify_trace(result.uri, contract, nonce="adadadadadadadad", endpoint=endpoint)
        took = time.monotonic() - t0
    finally:
        fake.misbehave = {}
    if mode == "drip":
        assert report.verdict == "ERROR" and "download_deadline" in report.error, report.summary()
        assert took < 15
    else:
        assert report.verdict == "FAIL" and report.failures[0].code == "hash_mismatch", report.summary()


def test_push_goes_up_in_bounded_commits_and_resumes_after_a_failure(hub, tmp_path, monkeypatch):
    """Files go up in commits of at most COMMIT_FILES (10 here, 100 by default: the Hub's advice),
    the root last; a push interrupted by a failed commit is finished by running it again, which
    uploads only what the Hub lacks; a push with nothing new makes no commit; files the Hub holds
    beyond the trace are deleted (else the verifier would FAIL the trace for them)."""
    import aftune_hf.hub as H
    from aftune_hf.errors import FetchError
    from aftune_hf.trace import TraceReader
    from tests.tracekit import write_trace

    fake, endpoint = hub
    trace = tmp_path / "t"
    write_trace(trace, steps=40, anchor_every=4)  # 40 checkpoints, 11 anchors: 88 step files + 4
    local = {p.relative_to(trace).as_posix() for p in trace.rglob("*") if p.is_file()}
    monkeypatch.setattr(H, "COMMIT_FILES", 10)
    fake.fail_commits = {fake.commits + 4}  # the 4th commit of this push fails
    with pytest.raises(FetchError, match="push_failed"):
        push_trace(trace, "me/batched", endpoint=endpoint, token="hf_test", progress=False)
    fake.fail_commits = set()
    _, partial = fake.files_at("model", "me/batched", "main")
    assert len(set(partial) - {".gitattributes"}) == 30 and "root.json" not in partial
    first = len(fake.log)
    result = push_trace(trace, "me/batched", endpoint=endpoint, token="hf_test", progress=False)
    resumed = fake.log[first:]
    assert result.commits == len(resumed) == 7 and result.commit_sha == resumed[-1][0]
    assert all(len(added) <= 10 for _, added, _ in resumed)
    assert sum(len(added) for _, added, _ in resumed) == len(local) - 30  # nothing uploaded twice
    assert "root.json" in resumed[-1][1] and all("root.json" not in a for _, a, _ in resumed[:-1])
    sha, files = fake.files_at("model", "me/batched", result.commit_sha)
    assert set(files) - {".gitattributes"} == local
    assert all(files[rel] == (trace / rel).read_bytes() for rel in local)

    again = push_trace(trace, "me/batched", endpoint=endpoint, token="hf_test", progress=False)
    assert again.commit_sha == result.commit_sha and len(fake.log) == first + 7  # nothing new: no commit
    fake.commit("model", "me/batched", "main", {"checkpoints/00000/step-00000099.safetensors": b"stale"}, [])
    cleaned = push_trace(trace, "me/batched", endpoint=endpoint, token="hf_test", progress=False)
    assert fake.log[-1][2] == ["checkpoints/00000/step-00000099.safetensors"]
    pulled = pull("me/batched", cleaned.commit_sha, tmp_path / "p", endpoint=endpoint)
    assert TraceReader(pulled).check_integrity().trace_root.hex() == result.trace_root


def test_a_trace_with_more_files_than_a_hub_repo_takes_is_refused_before_upload(hub, tmp_path, monkeypatch):
    import aftune_hf.hub as H
    from aftune_hf.errors import ConfigError
    from tests.tracekit import write_trace

    fake, endpoint = hub
    write_trace(tmp_path / "t", steps=10, anchor_every=2)
    monkeypatch.setattr(H, "HUB_MAX_FILES", 20)
    before = len(fake.requests)
    with pytest.raises(ConfigError, match="too_many_files"):
        push_trace(tmp_path / "t", "me/too-many", endpoint=endpoint, token="hf_test", progress=False)
    assert len(fake.requests) == before
