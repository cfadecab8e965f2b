"""scripts/verify.py under a real `accelerate launch` with two CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import transformers

from aftune_hf import AuditCallback
from aftune_hf.contract import load_contract
from aftune_hf.recipes.causal_lm import build
from aftune_hf.verify import verify_trace
from scripts.attacks.cheats import Cheat
from tests.conftest import REPO

pytestmark = pytest.mark.slow
# `accelerate launch --cpu --num_processes 2` starts ONE process on a CPU box; this starts two.
LAUNCH = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
SCRIPT = str(REPO / "scripts" / "verify.py")


def _record(contract_path, out, cheat=None):
    c = load_contract(contract_path)
    parts = build(c, str(out / "o"), disable_tqdm=True, logging_steps=1000)
    cbs = ([cheat] if cheat else []) + [AuditCallback(c, out / "trace")]
    transformers.Trainer(**parts.trainer_kwargs(), callbacks=cbs).train()
    return out / "trace"


def _launch(args, tmp_path, script=True):
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate CLI not on PATH")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*LAUNCH, *([SCRIPT] if script else []), *map(str, args)], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)


@pytest.mark.parametrize("cheat", [None, Cheat("nudge", 6)])
def test_two_processes_give_the_same_verdict_and_windows_as_one(write_contract, tmp_path, cheat):
    contract = write_contract(training={"max_steps": 8}, audit={"anchor_every": 2, "windows": 4})  # all: the cheat is always caught
    trace = _record(contract, tmp_path, cheat)
    p = _launch([trace, "--contract", contract, "--nonce", "5eed5eed5eed5eed", "--num-processes", "2", "--report", tmp_path / "r.json"], tmp_path)
    multi = json.loads((tmp_path / "r.json").read_text())
    assert "processes: 2" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]
    single = verify_trace(trace, contract, nonce="5eed5eed5eed5eed")
    assert p.returncode == single.exit_code
    assert multi["verdict"] == single.verdict == ("PASS" if cheat is None else "FAIL")
    assert [w["index"] for w in multi["windows"]] == [w.index for w in single.windows]
    assert [(f["check"], f["step"]) for f in multi["failures"]] == [(f.check, f.step) for f in single.failures]
    assert multi["data_check"]["steps_checked"] == 8


def test_world_size_mismatch_is_refused(write_contract, tmp_path):
    contract = write_contract(training={"max_steps": 2})
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "verify.py"), str(tmp_path), "--contract", str(contract),
                        "--num-processes", "2"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert p.returncode == 2 and "1 process(es) joined" in p.stderr


def test_two_processes_verify_a_hub_trace_like_aftune_verify(write_contract, tmp_path):
    """hf://REPO@SHA under accelerate (issue 14): was PASS with nothing replayed ("windows per process: [0]")."""
    from aftune_hf.hub import push_trace
    from tests.hub_server import FakeHub

    contract = write_contract(training={"max_steps": 8}, audit={"anchor_every": 2, "windows": 4})
    trace = _record(contract, tmp_path, Cheat("nudge", 5))
    hub = FakeHub()
    endpoint = hub.start()
    try:
        uri = push_trace(trace, "me/launch", endpoint=endpoint, token="hf_test").uri
        single = verify_trace(uri, contract, nonce="5eed5eed5eed5eed", endpoint=endpoint)
        p = _launch(["-m", "aftune_hf.launch", uri, "--contract", contract, "--nonce", "5eed5eed5eed5eed", "--num-processes", "2",
                     "--endpoint", endpoint, "--report", tmp_path / "r.json"], tmp_path, script=False)  # fmt: skip
    finally:
        hub.stop()
    multi = json.loads((tmp_path / "r.json").read_text())
    assert single.verdict == "FAIL" and p.returncode == 1, p.stdout[-2000:] + p.stderr[-3000:]
    assert multi["verdict"] == "FAIL" and multi["source"] == uri
    assert sorted(w["index"] for w in multi["windows"]) == [w.index for w in single.windows] == [0, 1, 2, 3]
    assert [(f["check"], f["step"]) for f in multi["failures"]] == [(f.check, f.step) for f in single.failures]


def test_aftune_verify_processes_keeps_exit_codes_and_hides_torchrun(write_contract, tmp_path):
    """`aftune verify --processes 2`: exit 1 FAIL and 3 INCONCLUSIVE as in one process (accelerate
    launch alone turns every non-zero exit into 1 and prints torch-elastic's crash report)."""
    contract = write_contract(training={"max_steps": 8}, audit={"anchor_every": 2, "windows": 4})
    trace = _record(contract, tmp_path, Cheat("nudge", 4))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "aftune_hf", "verify", str(trace), "--contract", str(contract), "--nonce", "5eed5eed5eed5eed",
            "--processes", "2"]  # fmt: skip
    fail = subprocess.run([*base, "--report", str(tmp_path / "r.json")], capture_output=True, text=True, env=env, timeout=600)
    assert fail.returncode == 1 and fail.stdout.startswith("FAIL"), fail.stdout[-2000:] + fail.stderr[-2000:]
    assert "processes: 2" in fail.stdout and "Traceback" not in fail.stdout + fail.stderr
    assert json.loads((tmp_path / "r.json").read_text())["failures"][0]["step"] == 4
    weak = subprocess.run([*base, "--windows", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert weak.returncode == 3 and weak.stdout.startswith("INCONCLUSIVE"), weak.stdout[-2000:] + weak.stderr[-2000:]
