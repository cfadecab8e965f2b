"""Fuzzing the verifier: any mutation of an honest trace is a FAIL -- never PASS, ERROR or a crash.

A bounded number of examples runs in CI; `python scripts/fuzz_trace.py --examples N` runs long.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import pytest
import transformers
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from aftune_hf import AuditCallback
from aftune_hf.contract import load_contract
from aftune_hf.fuzz import KINDS, Mutation, apply_mutation
from aftune_hf.recipes.causal_lm import build
from aftune_hf.verify import verify_trace

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def honest(tmp_path_factory, base_model_dir):
    from tests.conftest import CONFIGS, DATASET

    work = tmp_path_factory.mktemp("fuzz")
    data = yaml.safe_load((CONFIGS / "tiny-lora.yaml").read_text())
    data["base_model"]["path"], data["dataset"]["path"] = str(base_model_dir), str(DATASET)
    data["training"]["max_steps"] = 4
    data["audit"].update(anchor_every=2, windows=2)
    (work / "c.yaml").write_text(yaml.safe_dump(data))
    contract = load_contract(work / "c.yaml")
    parts = build(contract, str(work / "o"), disable_tqdm=True, logging_steps=1000)
    transformers.Trainer(**parts.trainer_kwargs(), callbacks=[AuditCallback(contract, work / "trace")]).train()
    assert verify_trace(work / "trace", contract, nonce="00").verdict == "PASS"
    return contract, work / "trace"


def _fingerprint(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(p.relative_to(root).as_posix().encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


mutations = st.builds(Mutation, st.sampled_from(KINDS), st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=mutations)
def test_no_mutation_passes(honest, m):
    contract, trace = honest
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "trace"
        shutil.copytree(trace, copy)
        before = _fingerprint(copy)
        what = apply_mutation(copy, m)
        assume(_fingerprint(copy) != before)
        report = verify_trace(copy, contract, nonce="00", only_windows=())
        assert report.verdict == "FAIL", f"{what}: {report.summary()}"
        assert report.failures and all(f.reason for f in report.failures)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=mutations)
def test_no_resealed_mutation_passes(honest, m):
    """A forger recomputes every provider-side commitment after the edit: semantic checks still FAIL it."""
    from aftune_hf.fuzz import reseal

    contract, trace = honest
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "trace"
        shutil.copytree(trace, copy)
        before = _fingerprint(copy)
        header = (copy / "aftune_trace.json").read_bytes()
        what = apply_mutation(copy, m)
        reseal(copy)
        assume(_fingerprint(copy) != before)
        import json

        try:  # the provider's self-reported environment is informational, not verified
            a, b = json.loads(header), json.loads((copy / "aftune_trace.json").read_bytes())
            assume(not (a != b and {**a, "environment": 0} == {**b, "environment": 0}))
        except (OSError, ValueError):
            pass
        report = verify_trace(copy, contract, nonce="00")
        assert report.verdict == "FAIL", f"{what}: {report.summary()}"
