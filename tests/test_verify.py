"""The verifier: honest traces PASS; cheats inside training FAIL at the right step; edits FAIL."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import transformers

from aftune_hf import AuditCallback
from aftune_hf import digest as D
from aftune_hf.contract import load_contract
from aftune_hf.recipes.causal_lm import build
from aftune_hf.report import report_from_json
from aftune_hf.trace import CHAIN, anchor_path, checkpoint_path
from aftune_hf.verify import make_challenge, verify_trace, window_bounds
from scripts.attacks.cheats import Cheat, SwapTrainer
from tests.conftest import REPO

pytestmark = pytest.mark.slow
STEPS, ANCHOR = 8, 2  # four windows: (0,2] (2,4] (4,6] (6,8]


def record(path, out, *, cheat=None, trainer_cls=transformers.Trainer, dataset_fn=None):
    contract = load_contract(path)
    parts = build(contract, str(out / "trainer"), disable_tqdm=True, logging_steps=1000)
    kwargs = parts.trainer_kwargs()
    if dataset_fn:
        kwargs["train_dataset"] = dataset_fn(kwargs["train_dataset"])
    callbacks = ([cheat] if cheat else []) + [AuditCallback(contract, out / "trace")]
    trainer = trainer_cls(**kwargs, callbacks=callbacks)
    trainer.train()
    return out / "trace", trainer


@pytest.fixture(scope="module")
def contracts(tmp_path_factory, base_model_dir):
    import yaml

    from tests.conftest import CONFIGS, DATASET

    out = {}
    d = tmp_path_factory.mktemp("contracts")
    for name in ("tiny-lora", "tiny-full"):
        data = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        data["base_model"]["path"] = str(base_model_dir)
        data["dataset"]["path"] = str(DATASET)
        data["training"]["max_steps"] = STEPS
        data["audit"].update(anchor_every=ANCHOR, windows=4)
        (d / f"{name}.yaml").write_text(yaml.safe_dump(data))
        out[name] = d / f"{name}.yaml"
    return out


@pytest.fixture(scope="module")
def honest(contracts, tmp_path_factory):
    return {name: record(path, tmp_path_factory.mktemp(name))[0] for name, path in contracts.items()}


def fresh_copy(trace, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(trace, dst)
    return dst


@pytest.mark.parametrize("name", ["tiny-lora", "tiny-full"])
def test_honest_trace_passes_exact_mode(honest, contracts, name, tmp_path):
    report = verify_trace(honest[name], contracts[name], nonce="0101010101010101")
    assert report.verdict == "PASS", report.summary()
    assert [w.index for w in report.windows] == [0, 1, 2, 3]
    assert all(c.ok and c.state_equal for w in report.windows for c in w.steps)
    assert report.data_check.steps_checked == STEPS and not report.data_check.mismatched_steps
    # the delivered model must equal the final state
    final = fresh_copy(honest[name], tmp_path)
    report = verify_trace(final, contracts[name], nonce="0101010101010101", windows=4, model=final / checkpoint_path(STEPS))
    assert report.verdict == "PASS", report.summary()


def test_delivered_model_other_than_audited_fails(honest, contracts, tmp_path):
    t = safetensors.torch.load_file(honest["tiny-lora"] / checkpoint_path(STEPS - 1))
    safetensors.torch.save_file(t, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    report = verify_trace(honest["tiny-lora"], contracts["tiny-lora"], nonce="0101010101010101", model=tmp_path)
    assert report.verdict == "FAIL" and report.failures[0].code == "model_mismatch"


def test_peft_saved_adapter_is_accepted_as_delivered_model(honest, contracts, tmp_path):
    """What a provider actually hands over: PeftModel.save_pretrained of the final adapter."""
    contract = load_contract(contracts["tiny-lora"])
    parts = build(contract, str(tmp_path / "o"))
    final = safetensors.torch.load_file(honest["tiny-lora"] / checkpoint_path(STEPS))
    with torch.no_grad():
        for n, p in parts.model.named_parameters():
            if p.requires_grad:
                p.copy_(final[n])
    parts.model.save_pretrained(tmp_path / "delivered")
    report = verify_trace(honest["tiny-lora"], contract, nonce="0101010101010101", windows=4, model=tmp_path / "delivered")
    assert report.verdict == "PASS", report.summary()


@pytest.mark.parametrize("kind,step", [("skip_update", 3), ("lr", 6), ("nudge", 5)])
def test_cheat_inside_training_fails_when_challenged(contracts, tmp_path, kind, step):
    trace, _ = record(contracts["tiny-lora"], tmp_path, cheat=Cheat(kind, step))
    report = verify_trace(trace, contracts["tiny-lora"], nonce="0202020202020202")  # all 4 windows challenged
    assert report.verdict == "FAIL"
    assert not report.data_check.mismatched_steps  # the data was honest
    assert report.failures[0].step == step, report.summary()  # the first divergence is the cheated step
    assert all(f.check == "replay" for f in report.failures)
    # only the cheated window fails; it diverges exactly at the cheated step
    bad = [w for w in report.windows if not w.ok]
    assert len(bad) == 1 and bad[0].start < step <= bad[0].end
    assert [c.step for c in bad[0].steps if c.ok] == list(range(bad[0].start + 1, step))


def test_replaced_batch_fails_data_check_even_unchallenged(contracts, tmp_path):
    def poison(ds):
        return ds.map(lambda row, i: {**row, "input_ids": [257] + [65] * (len(row["input_ids"]) - 1)} if i == 7 else row,
                      with_indices=True)  # fmt: skip

    trace, _ = record(contracts["tiny-lora"], tmp_path, dataset_fn=poison)
    report = verify_trace(trace, contracts["tiny-lora"], nonce="0303030303030303", only_windows=())
    assert report.verdict == "FAIL" and not report.windows
    assert len(report.data_check.mismatched_steps) == 1
    poisoned = report.data_check.mismatched_steps[0]
    full = verify_trace(trace, contracts["tiny-lora"], nonce="0303030303030303")
    assert poisoned in {f.step for f in full.failures if f.check == "replay"}


def test_swapped_batches_fail_data_check_and_replay(contracts, tmp_path):
    trace, _ = record(contracts["tiny-lora"], tmp_path, trainer_cls=SwapTrainer)
    report = verify_trace(trace, contracts["tiny-lora"], nonce="0404040404040404")
    assert report.verdict == "FAIL"
    assert report.data_check.mismatched_steps == (5, 6)
    assert {f.step for f in report.failures if f.check == "replay"} >= {5}


@pytest.mark.parametrize("target", ["checkpoint", "anchor_json", "anchor_params", "chain", "card"])
def test_post_hoc_edit_fails_structure_even_unchallenged(honest, contracts, tmp_path, target):
    trace = fresh_copy(honest["tiny-lora"], tmp_path)
    if target == "checkpoint":
        f = trace / checkpoint_path(3)
        t = safetensors.torch.load_file(f)
        k = sorted(t)[0]
        t[k] = t[k] * 1.01
        safetensors.torch.save_file(t, f, metadata={"format": "pt"})
    elif target == "anchor_json":
        f = trace / anchor_path(4, "meta")
        meta = json.loads(f.read_text())
        meta["trainer_state"]["dict"]["global_step"] = 3
        f.write_bytes(D.canonical_json(meta))
    elif target == "anchor_params":
        f = trace / anchor_path(4, "params")
        t = safetensors.torch.load_file(f)
        k = sorted(t)[-1]
        t[k] = -t[k]
        safetensors.torch.save_file(t, f, metadata={"format": "pt"})
    elif target == "chain":
        lines = (trace / CHAIN).read_text().splitlines(keepends=True)
        (trace / CHAIN).write_text("".join(lines[:-1]))
    else:
        (trace / "README.md").write_text("edited")
    report = verify_trace(trace, contracts["tiny-lora"], nonce="0505050505050505", windows=1)
    assert report.verdict == "FAIL" and report.failures[0].check == "structure", report.summary()
    assert not report.windows


def test_other_contract_fails(honest, contracts, tmp_path):
    import yaml

    data = yaml.safe_load(contracts["tiny-lora"].read_text())
    data["training"]["learning_rate"] = 2e-3
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(data))
    report = verify_trace(honest["tiny-lora"], other, nonce="0606060606060606")
    assert report.verdict == "FAIL" and report.failures[0].code == "contract_mismatch"


def test_challenge_is_deterministic_and_nonce_dependent(honest, contracts):
    c = load_contract(contracts["tiny-lora"])
    assert window_bounds(c) == ((0, 2), (2, 4), (4, 6), (6, 8))
    root = bytes(32)
    a = make_challenge(c, root, b"\x01", 3)
    assert a == make_challenge(c, root, b"\x01", 3) and a.chosen[0] == 0 and a.chosen[-1] == 3 and len(a.chosen) == 3
    assert {make_challenge(c, root, bytes([i]), 3).chosen for i in range(20)} == {(0, 1, 3), (0, 2, 3)}
    r1 = verify_trace(honest["tiny-lora"], c, nonce="aaaaaaaaaaaaaaaa", windows=3, data_check=False)
    r2 = verify_trace(honest["tiny-lora"], c, nonce="aaaaaaaaaaaaaaaa", windows=3, data_check=False)
    assert [w.index for w in r1.windows] == [w.index for w in r2.windows] and r1.seed == r2.seed
    assert r1.detection.windows_total == 4 and r1.detection.windows_checked == 3


def test_verifier_side_problem_is_error_not_pass(honest, contracts, tmp_path, monkeypatch):
    import aftune_hf.verify.window as V

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(V, "replay_window", broken)
    report = verify_trace(honest["tiny-lora"], contracts["tiny-lora"], nonce="0707070707070707", windows=2)
    assert report.verdict == "ERROR" and report.exit_code == 2


def test_cli_exit_codes_and_report(honest, contracts, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "aftune_hf", "verify", str(honest["tiny-lora"]), "--contract", str(contracts["tiny-lora"]),
           "--nonce", "0badc0de0badc0de", "--windows", "4", "--report", str(tmp_path / "r.json"), "--quiet"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith("PASS")
    report = report_from_json(json.loads((tmp_path / "r.json").read_text()))
    assert report.verdict == "PASS" and report.nonce == "0badc0de0badc0de"
    bad = fresh_copy(honest["tiny-lora"], tmp_path)
    (bad / checkpoint_path(2)).write_bytes(b"garbage")
    p = subprocess.run([*cmd[:4], str(bad), *cmd[5:]], capture_output=True, text=True, env=env)
    assert p.returncode == 1 and p.stdout.startswith("FAIL")
    p = subprocess.run([*cmd[:4], str(tmp_path / "missing"), *cmd[5:]], capture_output=True, text=True, env=env)
    assert p.returncode == 2
    p = subprocess.run([sys.executable, "-m", "aftune_hf", "inspect", str(honest["tiny-lora"])], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and "num_steps" in p.stdout


def _cli(args, **env):
    e = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-m", "aftune_hf", *map(str, args)], capture_output=True, text=True, env=e)


@pytest.fixture(scope="module")
def tolerance_setup(tmp_path_factory, base_model_dir):
    import yaml

    from tests.conftest import CONFIGS, DATASET

    d = tmp_path_factory.mktemp("tol")
    data = yaml.safe_load((CONFIGS / "tiny-lora.yaml").read_text())
    data["base_model"]["path"], data["dataset"]["path"] = str(base_model_dir), str(DATASET)
    data["training"]["max_steps"] = STEPS
    data["audit"].update(anchor_every=ANCHOR, windows=4, mode="tolerance", tolerance=1e-6, checkpoint_every=1)
    (d / "tol.yaml").write_text(yaml.safe_dump(data))
    trace, _ = record(d / "tol.yaml", d)
    return d / "tol.yaml", trace


def test_other_kernel_path_fails_exact_but_passes_tolerance(honest, contracts, tolerance_setup):
    """ATEN_CPU_CAPABILITY=default changes the bits: exact mode reports the replay's difference as the
    verifier's ERROR naming the CPU kernel path (not the provider's FAIL); tolerance mode passes."""
    exact = _cli(["verify", honest["tiny-lora"], "--contract", contracts["tiny-lora"], "--nonce", "0808080808080808", "--json"],
                 ATEN_CPU_CAPABILITY="default")  # fmt: skip
    assert exact.returncode == 2, exact.stdout[-2000:] + exact.stderr[-2000:]
    report = json.loads(exact.stdout)
    assert report["verdict"] == "ERROR" and "cpu_capability: trace " in report["error"], report["error"]
    assert any("state digest differs" in f["reason"] for f in report["failures"])  # what was seen is kept
    contract, trace = tolerance_setup
    tol = _cli(["verify", trace, "--contract", contract, "--nonce", "0808080808080808", "--json"], ATEN_CPU_CAPABILITY="default")
    assert tol.returncode == 0, tol.stdout[-3000:] + tol.stderr[-2000:]
    report = json.loads(tol.stdout)
    distances = [s["distance"] for w in report["windows"] for s in w["steps"]]
    assert len(distances) == STEPS and all(0 <= d <= 1e-6 for d in distances)
    assert max(distances) > 0  # the kernel path really differed, and the distances are reported


def test_tolerance_mode_still_catches_cheats(tolerance_setup, tmp_path):
    contract, _ = tolerance_setup
    trace, _ = record(contract, tmp_path, cheat=Cheat("lr", 4, amount=0.9))
    report = verify_trace(trace, contract, nonce="0909090909090909")
    assert report.verdict == "FAIL" and report.failures[0].step == 4, report.summary()
    step4 = next(c for w in report.windows for c in w.steps if c.step == 4)
    assert step4.distance > 1e-6


def test_calibrate_measures_honest_noise(tolerance_setup):
    contract, trace = tolerance_setup
    p = _cli(["calibrate", trace, "--contract", contract, "--json", "--windows", "2"], ATEN_CPU_CAPABILITY="default")
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(p.stdout)
    assert result["cpu_capability"] == "DEFAULT"
    assert 0 < result["max"] < 1e-6 and result["proposed_tolerance"] == pytest.approx(10 * result["max"])


def test_html_report_in_headless_chromium(tolerance_setup, tmp_path):
    """`aftune verify --html` and `aftune report --html`: the page a client forwards, opened in a real browser."""
    from tests.browser import render_in_chromium

    contract, trace = tolerance_setup
    p = _cli(["verify", trace, "--contract", contract, "--nonce", "0a0a0a0a0a0a0a0a", "--quiet", "--report", tmp_path / "pass.json",
              "--html", tmp_path / "pass.html"])  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    cheated, _ = record(contract, tmp_path / "cheat", cheat=Cheat("lr", 4, amount=0.9))
    verify_trace(cheated, contract, nonce="0a0a0a0a0a0a0a0a").write(tmp_path / "fail.json")
    p = _cli(["report", tmp_path / "fail.json", "--html", tmp_path / "fail.html"])
    assert p.returncode == 1, p.stderr[-2000:]  # `aftune report` exits with the report's verdict code
    for name, verdict in (("pass", "PASS"), ("fail", "FAIL")):
        dom = render_in_chromium(tmp_path / f"{name}.html", tmp_path / f"{name}.png")
        assert 'id="verdict" style="background:#' in dom and f">{verdict}</h1>" in dom
        for plot in ("distance-plot", "loss-plot", "lr-plot"):  # each holds an SVG with a drawn line
            block = dom.split(f'id="{plot}"', 1)[1].split("</div>", 1)[0]
            assert "<svg" in block and 'class="series"' in block and "points=" in block, plot
        assert 'class="tolerance"' in dom  # the contract's tolerance is drawn on the distance plot
        assert "http://" not in dom.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing fetched
    fail_dom = render_in_chromium(tmp_path / "fail.html", tmp_path / "fail2.png")
    assert 'id="failures"' in fail_dom and 'class="failed-step"' in fail_dom and "replay_mismatch" in fail_dom


@pytest.mark.parametrize("distributed", [False, True])
def test_device_rng_is_restored_in_the_shape_the_trainer_expects(distributed):
    """The recorder keeps every visible GPU's generator (a list); the replaying Trainer restores one
    tensor when it is not distributed and a list when it is (found on a GPU: a list in a one-process
    replay was refused by torch, so dropout masks differed and an honest exact trace FAILed)."""
    from transformers.trainer_pt_utils import set_rng_state_for_device

    from aftune_hf.replay import trainer_rng

    states = {"cpu": torch.get_rng_state(), "cuda": [torch.full((16,), i, dtype=torch.uint8) for i in range(2)]}
    restored = []

    class FakeCuda:  # torch.cuda's RNG functions, checking the argument types torch checks
        class random:
            @staticmethod
            def set_rng_state(t):
                assert isinstance(t, torch.Tensor), type(t)
                restored.append(t)

            @staticmethod
            def set_rng_state_all(ts):
                assert isinstance(ts, list) and all(isinstance(t, torch.Tensor) for t in ts)
                restored.extend(ts)

    out = trainer_rng(states, distributed)
    set_rng_state_for_device("CUDA", FakeCuda, out, distributed)  # logs (does not raise) what torch refuses
    assert [int(t[0]) for t in restored] == ([0, 1] if distributed else [0])
    assert out["cpu"] is states["cpu"]
    assert trainer_rng({"cuda": states["cuda"][1]}, True)["cuda"][0] is states["cuda"][1]
