"""A 20 000-step trace on the Hub: layout within the Hub's limits, bounded commits, lazy verification.

A real Trainer run of the tiny LoRA model (one example per step, 16 tokens) recorded by
AuditCallback for 20 000 steps (about 6 minutes here), pushed with the real huggingface_hub
client to tests/hub_server.py (a local HTTP server standing in for the Hub: there is no network
here), then verified from ``hf://`` with 3 windows: only the files the checks open are downloaded.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
import transformers
import yaml

from aftune_hf import AuditCallback
from aftune_hf.contract import load_contract
from aftune_hf.hub import push_trace
from aftune_hf.recipes.causal_lm import build
from aftune_hf.trace import HUB_MAX_FILES, anchor_path, checkpoint_path, file_count
from aftune_hf.verify import verify_trace
from tests.conftest import CONFIGS, DATASET

pytestmark = pytest.mark.slow
STEPS = 20_000


@pytest.fixture(scope="module")
def long_trace(tmp_path_factory, base_model_dir):
    work = tmp_path_factory.mktemp("long")
    data = yaml.safe_load((CONFIGS / "tiny-lora.yaml").read_text())
    data["base_model"]["path"], data["dataset"]["path"] = str(base_model_dir), str(DATASET)
    data["training"].update(max_steps=STEPS, per_device_train_batch_size=1, gradient_accumulation_steps=1, warmup_steps=100)
    data["training"]["padding"]["max_length"] = 16
    data["recipe_args"]["dropout"], data["peft"]["lora_dropout"] = 0.0, 0.0
    # 2 000 windows of 10 steps; 3 re-executed is a smoke audit, not a strong one: min_detection 0
    data["audit"].update(anchor_every=10, checkpoint_every=10, windows=3, min_detection=0.0)
    (work / "c.yaml").write_text(yaml.safe_dump(data))
    contract = load_contract(work / "c.yaml")
    parts = build(contract, str(work / "o"), disable_tqdm=True, logging_steps=STEPS, save_strategy="no")
    t0 = time.perf_counter()
    transformers.Trainer(**parts.trainer_kwargs(), callbacks=[AuditCallback(contract, work / "trace")]).train()
    print(f"recorded {STEPS} steps in {time.perf_counter() - t0:.0f} s")
    return work / "c.yaml", work / "trace"


def test_twenty_thousand_steps_fit_the_hub_and_verify_from_a_few_files(long_trace, hub):
    contract, trace = long_trace
    fake, endpoint = hub
    files = [p.relative_to(trace).as_posix() for p in trace.rglob("*") if p.is_file()]
    assert len(files) == file_count(STEPS, 10, 10) < HUB_MAX_FILES
    folders = Counter(rel.rsplit("/", 1)[0] if "/" in rel else "" for rel in files)
    entries = Counter()
    for p in trace.rglob("*"):
        entries[p.parent] += 1
    assert max(entries.values()) <= 1000, entries.most_common(3)  # the Hub: < 10 000 entries per folder
    assert len(folders) > 2000  # one folder per anchor, 20 shard folders each for checkpoints and anchors

    t0 = time.perf_counter()
    result = push_trace(trace, "me/long", endpoint=endpoint, token="hf_test", progress=False)
    pushed = time.perf_counter() - t0
    assert all(len(added) + len(deleted) <= 100 for _, added, deleted in fake.log)
    assert result.commits == len(fake.log) >= len(files) // 100

    t0 = time.perf_counter()
    report = verify_trace(result.uri, contract, nonce="a1" * 16, endpoint=endpoint)
    verified = time.perf_counter() - t0
    assert report.verdict == "PASS", report.summary()
    assert len(report.windows) == 3 and report.num_steps == STEPS and report.data_check.steps_checked == STEPS
    d = report.download
    print(f"pushed {len(files)} files in {result.commits} commits in {pushed:.0f} s; verified in {verified:.0f} s; "
          f"downloaded {d.bytes:,} of {d.trace_bytes:,} bytes ({d.files} of {d.trace_files} files)")
    # exactly what the checks open: header, chain, root, card; the step-0 anchor; each chosen window's
    # two anchors and its checkpoint (the chain, 450 B a step, is most of it for this tiny model)
    wanted = {"aftune_trace.json", "chain.jsonl", "root.json", "README.md"}
    for s in {0} | {w.start for w in report.windows} | {w.end for w in report.windows}:
        wanted |= {anchor_path(s, p) for p in ("params", "optimizer", "rng", "meta")}
    wanted |= {checkpoint_path(w.end) for w in report.windows}
    assert d.trace_files == len(files) and d.trace_bytes == sum((trace / f).stat().st_size for f in files)
    assert (d.files, d.bytes) == (len(wanted), sum((trace / f).stat().st_size for f in wanted))
    assert d.bytes < d.trace_bytes / 10
    downloads = [r for r in fake.requests if "/resolve/" in r]
    assert len(downloads) == d.files and all(f"/resolve/{result.commit_sha}/" in r for r in downloads)
    assert "downloaded" in report.summary()

    # a server that serves other bytes for a file the checks open: FAIL when it arrives
    fake.tamper("me/long", result.commit_sha, anchor_path(0, "rng"), b"\0" * 16)
    tampered = verify_trace(result.uri, contract, nonce="a1" * 16, endpoint=endpoint, data_check=False)
    assert tampered.verdict == "FAIL" and tampered.failures[0].code == "hash_mismatch", tampered.summary()
