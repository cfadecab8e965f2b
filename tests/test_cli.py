"""Bad command lines end in one clear line on stderr and exit 2 (issue 16, table-driven)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import CONFIGS, REPO


def _run(args, *, shell_pipe: str | None = None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if shell_pipe:
        cmd = " ".join([sys.executable, "-m", "aftune_hf", *map(str, args)]) + f" | {shell_pipe}"
        return subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, env=env)
    return subprocess.run([sys.executable, "-m", "aftune_hf", *map(str, args)], capture_output=True, text=True, env=env)


def _contract_with(tmp_path, **changes):
    data = yaml.safe_load((CONFIGS / "tiny-lora.yaml").read_text())
    for section, value in changes.items():
        data[section] = {**data[section], **value} if isinstance(value, dict) else value
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def put(path, data: bytes):
    path.write_bytes(data)
    return path


CASES = {
    "binary contract file": lambda t: ["contract", put(t / "c.yaml", b"\x89PNG\r\n\x1a\n\xff\xfe\x00")],
    "YAML syntax error": lambda t: ["contract", put(t / "c.yaml", b"training: {learning_rate: [1,\n  audit: x\n")],
    "negative LoRA rank": lambda t: ["contract", _contract_with(t, peft={"r": -4})],
    "LoRA dropout of 1.5": lambda t: ["contract", _contract_with(t, peft={"lora_dropout": 1.5})],
    "report that is a JSON list": lambda t: ["report", put(t / "r.json", b"[1, 2]")],
    "contract init without a dataset": lambda t: ["contract", "init", "--model", t],
    "empty base_model.path directory": lambda t: ["contract", _contract_with(t, base_model={"path": str(_empty(t))}),
                                                  "--check-artifacts"],
    "1-byte nonce": lambda t: ["verify", _fake_trace(t), "--contract", _contract_with(t), "--nonce", "00"],
    "empty nonce": lambda t: ["verify", _fake_trace(t), "--contract", _contract_with(t), "--nonce", ""],
    "4-byte nonce": lambda t: ["verify", _fake_trace(t), "--contract", _contract_with(t), "--nonce", "0badc0de"],
    "200-byte nonce": lambda t: ["verify", _fake_trace(t), "--contract", _contract_with(t), "--nonce", "ab" * 200],
    "non-hex nonce": lambda t: ["verify", _fake_trace(t), "--contract", _contract_with(t), "--nonce", "zz" * 8],
    "empty directory as TRACE": lambda t: ["verify", _empty(t), "--contract", _contract_with(t)],
    "/ as TRACE": lambda t: ["inspect", "/"],
    "a source checkout as TRACE": lambda t: ["inspect", REPO],
    "empty directory as LOG": lambda t: ["verify-inference", _empty(t), "--contract", _contract_with(t)],
    "push with an invalid repo id": lambda t: ["push", _fake_trace(t), "not a repo id!"],
    "push to an unreachable endpoint": lambda t: ["push", _fake_trace(t), "me/x", "--endpoint", "http://127.0.0.1:9"],
    "sign with a key that is not PEM": lambda t: ["sign", _fake_trace(t), "--key", put(t / "k", b"ssh-ed25519 AAAA")],
    "verify with an unreadable signer key": lambda t: ["verify", _fake_trace(t), "--contract", _contract_with(t),
                                                       "--signer", t / "missing.pub"],
}


def _empty(t):
    (t / "empty").mkdir(exist_ok=True)
    return t / "empty"


def _fake_trace(t):
    """A directory that looks like a trace (the command must refuse before reading it)."""
    (t / "trace").mkdir(exist_ok=True)
    put(t / "trace" / "chain.jsonl", b"")
    return t / "trace"


# cases where a library might print on its own (logging, warnings): run as a real process
SUBPROCESS = {"push to an unreachable endpoint", "push with an invalid repo id", "empty base_model.path directory",
              "binary contract file"}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_ends_in_one_line_and_exit_2(case, tmp_path, capfd):
    args = [str(a) for a in CASES[case](tmp_path)]
    if case in SUBPROCESS:
        p = _run(args)
        code, stderr = p.returncode, p.stderr
    else:  # in-process: the same main(), without a Python start-up per case
        from aftune_hf.cli import main

        code = main(args)
        stderr = capfd.readouterr().err
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2 and "Traceback" not in stderr, stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("aftune: error: "), stderr


def test_json_flag_prints_a_json_error_object(tmp_path):
    p = _run(["contract", _contract_with(tmp_path, peft={"r": -4}), "--json"])
    out = json.loads(p.stdout)
    assert p.returncode == 2 and out["verdict"] == "ERROR" and out["error"] == "invalid_value" and "peft.r" in out["detail"]


def test_a_broken_pipe_ends_quietly(tmp_path):
    from tests import tracekit

    tracekit.write_trace(tmp_path / "t", steps=40)
    p = _run(["inspect", tmp_path / "t"], shell_pipe="head -c 10")
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr[-2000:]


def test_quiet_silences_the_libraries_too(tmp_path, base_model_dir):
    """`--quiet`: not a line on stderr on a PASS (transformers' weight-loading bars, datasets' map
    bars and warnings included)."""
    from tests.conftest import record_tiny

    contract, trace = record_tiny(tmp_path, base_model_dir, steps=2, anchor_every=1, windows=2)
    p = _run(["verify", trace, "--contract", contract, "--nonce", "ab" * 8, "--quiet"])
    assert p.returncode == 0 and p.stdout.startswith("PASS") and p.stderr == "", p.stderr[-2000:]
