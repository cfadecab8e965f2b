"""Fuzzing the verifier: any mutation of an honest trace is a FAIL -- never PASS, ERROR or a crash.

A bounded number of examples runs in CI; `python scripts/fuzz_trace.py --examples N` runs long.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from aftune_hf.contract import load_contract
from aftune_hf.fuzz import KINDS, Mutation, apply_mutation, fingerprint, only_environment_changed
from aftune_hf.trace import anchor_path
from aftune_hf.verify import verify_trace
from tests.conftest import record_tiny

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def honest(tmp_path_factory, base_model_dir):
    path, trace = record_tiny(tmp_path_factory.mktemp("fuzz"), base_model_dir, steps=4, anchor_every=2, windows=2)
    contract = load_contract(path)
    assert verify_trace(trace, contract, nonce="0000000000000000").verdict == "PASS"
    return contract, trace


mutations = st.builds(Mutation, st.sampled_from(KINDS), st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6))


def _check(honest, m: Mutation, *, resealed: bool) -> None:
    from aftune_hf.fuzz import reseal

    contract, trace = honest
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "trace"
        shutil.copytree(trace, copy)
        before = fingerprint(copy)
        what = apply_mutation(copy, m)
        if resealed:
            reseal(copy)
        assume(fingerprint(copy) != before)
        assume(not only_environment_changed(trace, copy))  # the provider's environment is informational
        report = verify_trace(copy, contract, nonce="0000000000000000", only_windows=None if resealed else ())
        assert report.verdict == "FAIL", f"{what}: {report.summary()}"
        assert report.failures and all(f.reason for f in report.failures)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=mutations)
def test_no_mutation_passes(honest, m):
    _check(honest, m, resealed=False)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=mutations)
def test_no_resealed_mutation_passes(honest, m):
    """A forger recomputes every provider-side commitment after the edit: semantic checks and replay still FAIL it."""
    _check(honest, m, resealed=True)


@pytest.mark.parametrize("value", [[], [None, None], None])
def test_resealed_anchor_rng_meta_of_another_world_size_fails(honest, value, tmp_path):
    """Found by the resealing fuzzer: the final anchor's RNG meta replaced by a list PASSed, because
    an anchor holding another number of processes' RNG silenced the end-state RNG comparison."""
    import json

    from aftune_hf.fuzz import reseal

    contract, trace = honest
    copy = tmp_path / "trace"
    shutil.copytree(trace, copy)
    meta_path = copy / anchor_path(4, "meta")
    meta = json.loads(meta_path.read_text())
    meta["rng"] = value
    meta_path.write_text(json.dumps(meta, sort_keys=True, separators=(",", ":")))
    reseal(copy)
    report = verify_trace(copy, contract, nonce="0000000000000000")
    assert report.verdict == "FAIL", report.summary()
