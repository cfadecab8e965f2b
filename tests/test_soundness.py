"""Issue 14: the verifier trusts nothing it did not re-derive.

Every test here reproduces a cheat that verified PASS on main @ 99537ca (with every window
re-executed) or an honest job reported wrongly, and asserts the verdict it must get now.
"""

from __future__ import annotations

# ruff: noqa: F811 - the fixtures imported from tests.test_verify are redefined as arguments

import json
import shutil

import pytest
import yaml

from aftune_hf import digest as D
from aftune_hf.contract import load_contract
from aftune_hf.trace import CHAIN, anchor_path
from aftune_hf.verify import verify_trace
from scripts.attacks.cheats import ANCHOR_EDITS, AnchorEdit
from tests.test_verify import ANCHOR, STEPS, contracts, honest, record, tolerance_setup  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow
HYPER = {"lr_zero", "lr_double", "weight_decay", "maximize", "betas"}  # caught structurally, at every anchor


@pytest.mark.parametrize("kind", ANCHOR_EDITS)
def test_anchor_state_edited_in_training_fails_lora(contracts, tmp_path, kind):
    trace, _ = record(contracts["tiny-lora"], tmp_path, cheat=AnchorEdit(kind, 4))
    # structural checks see hyper-parameters even when no window is re-executed
    structural = verify_trace(trace, contracts["tiny-lora"], nonce="0101010101010101", only_windows=())
    full = verify_trace(trace, contracts["tiny-lora"], nonce="0101010101010101")  # every window
    assert full.verdict == "FAIL", full.summary()
    if kind in HYPER:
        assert structural.verdict == "FAIL" and structural.failures[0].check == "structure", structural.summary()
        assert structural.failures[0].code in ("anchor_hyperparameters", "lr_schedule")
        assert structural.failures[0].step in (4, 5), structural.summary()
    else:  # moments: only continuity can tell -- the window that ends at the edited anchor
        assert structural.verdict == "PASS", structural.summary()
        assert [(f.code, f.step) for f in full.failures] == [("anchor_state", 4)], full.summary()
        assert [w.index for w in full.windows if not w.ok] == [1]


@pytest.mark.parametrize("kind", ["lr_double", "moments"])
def test_anchor_state_edited_in_training_fails_full_ft(contracts, tmp_path, kind):
    trace, _ = record(contracts["tiny-full"], tmp_path, cheat=AnchorEdit(kind, 6))
    report = verify_trace(trace, contracts["tiny-full"], nonce="0202020202020202")
    assert report.verdict == "FAIL", report.summary()
    assert report.failures[0].step in (6, 7), report.summary()


@pytest.mark.parametrize("kind", ["maximize", "one_moment"])
def test_anchor_state_edited_in_training_fails_tolerance_mode(tolerance_setup, tmp_path, kind):
    contract, _ = tolerance_setup
    trace, _ = record(contract, tmp_path, cheat=AnchorEdit(kind, 4))
    report = verify_trace(trace, contract, nonce="0303030303030303")
    assert report.verdict == "FAIL", report.summary()
    assert report.failures[0].step in (4, 5), report.summary()


def _reseal_anchor(trace, step, edit):
    """A forger's edit of the anchor JSON at ``step``, every digest recomputed with our own code."""
    from aftune_hf.fuzz import reseal

    meta_path = trace / anchor_path(step, "meta")
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_bytes(D.canonical_json(meta))
    reseal(trace)


@pytest.mark.parametrize("step", [0, 4, STEPS])
def test_resealed_anchor_meta_edit_fails(honest, contracts, tmp_path, step):
    """The non-parameter parts of the step-0 and final anchors were never checked."""
    trace = tmp_path / "t"
    shutil.copytree(honest["tiny-lora"], trace)

    def edit(meta):  # the scheduler's base lr x2: replay from it would train at another lr
        sched = meta["scheduler"]["dict"]
        sched["base_lrs"] = [{"float": D.encode_float(2 * D.decode_float(b["float"]))} for b in sched["base_lrs"]]

    _reseal_anchor(trace, step, edit)
    report = verify_trace(trace, contracts["tiny-lora"], nonce="0404040404040404", only_windows=())
    assert report.verdict == "FAIL", report.summary()
    assert report.failures[0].code == "anchor_hyperparameters" and report.failures[0].step == step


def test_resealed_rng_edit_fails_the_window_before(honest, contracts, tmp_path):
    trace = tmp_path / "t"
    shutil.copytree(honest["tiny-lora"], trace)

    def edit(meta):
        meta["rng"]["python"]["state"][5] ^= 1

    _reseal_anchor(trace, 6, edit)
    report = verify_trace(trace, contracts["tiny-lora"], nonce="0505050505050505")
    assert report.verdict == "FAIL", report.summary()
    assert ("anchor_state", 6) in [(f.code, f.step) for f in report.failures], report.summary()


def test_recorded_lr_off_schedule_fails_every_step_unchallenged(honest, contracts, tmp_path):
    """The lr of every step is the contract's schedule (no forward pass; like the data check)."""
    from aftune_hf.fuzz import reseal

    trace = tmp_path / "t"
    shutil.copytree(honest["tiny-lora"], trace)
    lines = (trace / CHAIN).read_text().splitlines()
    obj = json.loads(lines[3])
    obj["record"]["lr"] = D.encode_float(D.decode_float(obj["record"]["lr"]) * (1 + 2**-40))
    lines[3] = json.dumps(obj)
    (trace / CHAIN).write_text("\n".join(lines) + "\n")
    reseal(trace)
    report = verify_trace(trace, contracts["tiny-lora"], nonce="0606060606060606", only_windows=())
    assert report.verdict == "FAIL" and report.failures[0].code == "lr_schedule", report.summary()
    assert report.failures[0].step == obj["record"]["step"]


def test_windows_must_be_at_least_one_and_weak_pass_is_inconclusive(honest, contracts):
    from aftune_hf.errors import ConfigError
    from tests.test_verify import _cli

    for bad in (0, -1):
        with pytest.raises(ConfigError):
            verify_trace(honest["tiny-lora"], contracts["tiny-lora"], windows=bad)
        p = _cli(["verify", honest["tiny-lora"], "--contract", contracts["tiny-lora"], "--windows", str(bad)])
        assert p.returncode == 2 and "--windows" in p.stderr
    # 4 windows, 2 checked (always the first and last): a cheat in a middle window is never caught
    weak = verify_trace(honest["tiny-lora"], contracts["tiny-lora"], nonce="0707070707070707", windows=2)
    assert weak.verdict == "INCONCLUSIVE" and weak.exit_code == 3, weak.summary()
    assert weak.detection.achieved == 0.0 and weak.detection.required == 0.9
    assert "too few windows" in weak.summary()
    strong = verify_trace(honest["tiny-lora"], contracts["tiny-lora"], nonce="0707070707070707", windows=4)
    assert strong.verdict == "PASS" and strong.detection.achieved == 1.0


def test_clients_own_wrong_files_are_error_not_fail(honest, contracts, tmp_path):
    data = yaml.safe_load(contracts["tiny-lora"].read_text())
    other = tmp_path / "data.jsonl"
    other.write_text(open(data["dataset"]["path"]).read().replace("a", "b", 1))
    data["dataset"]["path"] = str(other)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    report = verify_trace(honest["tiny-lora"], tmp_path / "c.yaml", nonce="0808080808080808")
    assert report.verdict == "ERROR" and "data.jsonl" in report.error and "your local file" in report.error, report.summary()


def test_verifier_out_of_memory_is_error(honest, contracts, monkeypatch):
    import aftune_hf.verify.window as V

    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                           "allocate 6442450944 bytes.")  # fmt: skip

    monkeypatch.setattr(V, "replay_window", oom)
    report = verify_trace(honest["tiny-lora"], contracts["tiny-lora"], nonce="0909090909090909", windows=4)
    assert report.verdict == "ERROR" and "out_of_memory" in report.error, report.summary()


def test_nan_grad_norm_fails_tolerance_mode(tolerance_setup, tmp_path):
    from aftune_hf.fuzz import reseal

    contract, honest_trace = tolerance_setup
    trace = tmp_path / "t"
    shutil.copytree(honest_trace, trace)
    lines = (trace / CHAIN).read_text().splitlines()
    obj = json.loads(lines[2])
    obj["record"]["grad_norm"] = D.encode_float(float("nan"))
    lines[2] = json.dumps(obj)
    (trace / CHAIN).write_text("\n".join(lines) + "\n")
    reseal(trace)
    report = verify_trace(trace, contract, nonce="0a0a0a0a0a0a0a0a")
    assert report.verdict == "FAIL", report.summary()
    assert any("grad norm" in f.reason and f.step == obj["record"]["step"] for f in report.failures), report.summary()


def _delivered(contract_path, trace, out, *, full: bool):
    """What an honest provider hands over: ``save_pretrained`` of the final state."""
    import safetensors.torch
    import torch

    from aftune_hf.recipes.causal_lm import build
    from aftune_hf.trace import checkpoint_path

    parts = build(load_contract(contract_path), str(out / "o"))
    final = safetensors.torch.load_file(trace / checkpoint_path(STEPS))
    with torch.no_grad():
        for n, p in parts.model.named_parameters():
            if p.requires_grad:
                p.copy_(final[n])
    parts.model.save_pretrained(out / "delivered")
    return out / "delivered"


def _edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("edit", ["honest", "lora_alpha", "extra_module", "lora_dropout"])
def test_delivered_adapter_is_checked_whole(honest, contracts, tmp_path, edit):
    import safetensors.torch
    import torch

    d = _delivered(contracts["tiny-lora"], honest["tiny-lora"], tmp_path, full=False)
    if edit == "lora_alpha":
        _edit_json(d / "adapter_config.json", lambda c: c.update(lora_alpha=c["lora_alpha"] * 2))
    if edit == "extra_module":  # one more LoRA module, listed in the config, with its tensors
        _edit_json(d / "adapter_config.json", lambda c: c.update(target_modules=sorted(c["target_modules"]) + ["k_proj"]))
        t = safetensors.torch.load_file(d / "adapter_model.safetensors")
        t["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(4, 64)
        t["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"] = torch.full((32, 4), 1e-3)
        safetensors.torch.save_file(t, d / "adapter_model.safetensors", metadata={"format": "pt"})
    if edit == "lora_dropout":  # training-only: ignored, and docs/VERIFY.md says so
        _edit_json(d / "adapter_config.json", lambda c: c.update(lora_dropout=0.0))
    report = verify_trace(honest["tiny-lora"], contracts["tiny-lora"], nonce="0b0b0b0b0b0b0b0b", windows=4, model=d)
    if edit in ("honest", "lora_dropout"):
        assert report.verdict == "PASS", report.summary()
    else:
        assert report.verdict == "FAIL" and report.failures[0].code in ("model_config", "model_mismatch"), report.summary()


@pytest.mark.parametrize("edit", ["honest", "rms_norm_eps", "rope_theta"])
def test_delivered_full_model_config_is_checked(honest, contracts, tmp_path, edit):
    d = _delivered(contracts["tiny-full"], honest["tiny-full"], tmp_path, full=True)

    def rope(c):
        if "rope_theta" in c:
            c["rope_theta"] *= 2
        else:
            c["rope_parameters"]["rope_theta"] *= 2

    if edit == "rms_norm_eps":
        _edit_json(d / "config.json", lambda c: c.update(rms_norm_eps=1e-3))
    if edit == "rope_theta":
        _edit_json(d / "config.json", rope)
    report = verify_trace(honest["tiny-full"], contracts["tiny-full"], nonce="0c0c0c0c0c0c0c0c", windows=4, model=d)
    if edit == "honest":
        assert report.verdict == "PASS", report.summary()
    else:
        assert report.verdict == "FAIL" and report.failures[0].code == "model_config", report.summary()
        assert "config.json" in report.failures[0].reason


def test_oversized_checkpoint_is_fail_before_allocation(honest, contracts, tmp_path):
    """A forged checkpoint far larger than the schema allows is the provider's FAIL (was ERROR MemoryError)."""
    from aftune_hf.fuzz import reseal
    from aftune_hf.trace import checkpoint_path

    trace = tmp_path / "t"
    shutil.copytree(honest["tiny-lora"], trace)
    f = trace / checkpoint_path(3)
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size + (64 << 20))  # sparse: nothing is written, nothing may be read
    reseal(trace)
    report = verify_trace(trace, contracts["tiny-lora"], nonce="0d0d0d0d0d0d0d0d", only_windows=())
    assert report.verdict == "FAIL" and report.failures[0].code == "file_too_large", report.summary()
    assert report.failures[0].step == 3


def test_rng_is_compared_in_tolerance_mode_on_the_same_kind_of_device():
    """A provider must not pick its dropout masks: the torch generators count in tolerance mode too
    (only across device kinds, where other generators draw the masks, are just Python's and NumPy's compared)."""
    import torch

    from aftune_hf.verify.derive import end_state_differences
    from tests.tracekit import anchor_of, build

    model, opt, sched = build()
    a = anchor_of(0, model, opt, sched)
    torch.rand(3)  # the CPU generator moves on
    b = anchor_of(0, model, opt, sched)
    assert end_state_differences(a, a, tolerance=1e-6) == []
    assert end_state_differences(b, a, tolerance=1e-6) == ["rng cpu"]
    assert end_state_differences(b, a) == ["rng cpu"]


def test_an_integer_is_not_the_float_it_equals():
    """Found by the resealing fuzzer: an anchor's lr 0.0 (warmup start, cosine end) replaced by the
    integer 0 passed, because 0 == 0.0 in Python."""
    from aftune_hf.verify.derive import same_value

    assert same_value({"lr": 0.0, "n": [1, (2, 3)]}, {"lr": 0.0, "n": [1, (2, 3)]})
    assert not same_value(0, 0.0) and not same_value(1, True) and not same_value([0.0], [0])
    assert same_value(1.0, 1.0 + 1e-13, 1e-12) and not same_value(1.0, 1.0 + 1e-13)
    assert not same_value(float("nan"), 1.0, 1e-12)
