"""Layer-block cells end to end (issue 19): a real Trainer records the per-step cell commitments
(tiny Llama, 3 layers in 3 blocks, dropout 0.1, gradient accumulation 2, clipping, fused AdamW), the
provider opens challenged cells by replaying from its anchors, and the verifier re-executes each cell
holding only its block. Honest cells PASS; a weight nudge in one block at one step, or a boundary
activation forged consistently downstream, FAILs exactly the cell it is in; unopened or tampered
openings FAIL, never ERROR."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers

from aftune_hf.cells import opening
from aftune_hf.cells.check import check_cells
from aftune_hf.cells.opening import Cell, challenge_cells, open_cells
from aftune_hf.contract import load_contract
from aftune_hf.trace import TraceReader
from aftune_hf.verify import verify_trace
from tests import cellkit

pytestmark = pytest.mark.slow
BLOCKS = [0, 1, 2, 3]
NONCE = "5a" * 16
GRID = [Cell(s, b) for s in range(1, 5) for b in range(3)]
NUDGE = ("model.layers.1.mlp.down_proj.weight", 3)  # block 1, step 3
FORGE = (0, 2)  # the output of layer 0 (block 0's boundary) at step 2


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return cellkit.base(tmp_path_factory.mktemp("base3") / "llama3", 3)


def _config(contract):
    """The recipe's model config (what the verifier builds from the contract)."""
    from aftune_hf.recipes.causal_lm import build

    parts = build(contract, "/tmp/aftune-cells-config", disable_tqdm=True)
    return parts.model.config


def _check(work: Path, openings: Path, cells=GRID):
    c = load_contract(work / "c.yaml")
    steps = TraceReader(work / "trace").check_integrity().steps()
    return {(r.step, r.block): r for r in check_cells(c, steps, cells, openings, _config(c))}


@pytest.fixture(scope="module")
def honest(tmp_path_factory, base):
    work = tmp_path_factory.mktemp("honest")
    path = cellkit.contract(work, base, BLOCKS, cells=12, min_detection=0.9)
    cellkit.record(path, work / "trace")
    open_cells(load_contract(path), work / "trace", GRID, work / "open")
    return work


def test_honest_cells_pass(honest):
    results = _check(honest, honest / "open")
    assert len(results) == 12 and all(r.ok for r in results.values()), [r for r in results.values() if not r.ok]


def test_a_tied_llama_with_uneven_blocks_passes(tmp_path_factory):
    """tie_word_embeddings (the head is the embedding matrix), 4 layers in blocks [0, 1, 3, 4]."""
    work = tmp_path_factory.mktemp("tied")
    model = cellkit.base(work / "llama4", 4, tie_word_embeddings=True)
    path = cellkit.contract(work, model, [0, 1, 3, 4], steps=3)
    cellkit.record(path, work / "trace")
    grid = [Cell(s, b) for s in range(1, 4) for b in range(3)]
    open_cells(load_contract(path), work / "trace", grid, work / "open")
    results = _check(work, work / "open", grid)
    assert all(r.ok for r in results.values()), {k: r.detail for k, r in results.items() if not r.ok}


def test_verify_with_openings_passes_on_cells_alone(honest):
    report = verify_trace(honest / "trace", honest / "c.yaml", nonce=NONCE, windows=0, openings=honest / "open")
    assert report.verdict == "PASS", report.summary()
    assert len(report.cells) == 12 and report.windows == () and report.cell_detection.achieved == 1.0
    assert 0.99 < report.cell_detection.flops_share <= 1.0  # every cell of the grid: the whole run once
    assert "cell detection (12/12 cells)" in report.summary()
    import json

    from aftune_hf.htmlreport import render_html
    from aftune_hf.report import report_from_json

    assert "Layer-block cells" in render_html(report) and "12 of 12 cells re-executed" in render_html(report)
    again = report_from_json(json.loads(json.dumps(report.to_json())))
    assert again.cells == report.cells and again.cell_detection == report.cell_detection


def test_whole_window_replay_rederives_the_cell_commitments(honest):
    report = verify_trace(honest / "trace", honest / "c.yaml", nonce=NONCE, windows=2)
    assert report.verdict == "PASS", report.summary()


def test_challenge_is_the_nonce_and_root(honest):
    c = load_contract(honest / "c.yaml")
    root = TraceReader(honest / "trace").check_integrity().trace_root
    a = challenge_cells(c, root, bytes.fromhex(NONCE), 5)
    assert a == challenge_cells(c, root, bytes.fromhex(NONCE), 5) and len(set(a)) == 5
    assert a != challenge_cells(c, root, bytes.fromhex("5b" * 16), 5)
    assert all(1 <= x.step <= 4 and 0 <= x.block < 3 for x in a)


class _NudgeInTraining(transformers.TrainerCallback):
    """The cheat: after step 3's optimizer update, move one weight of block 1 (before the commit)."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == NUDGE[1]:
            with torch.no_grad():
                model.get_parameter(NUDGE[0]).view(-1)[7] += 1e-3


class _NudgeInOpening(opening.Regenerate):
    """The same cheat in the provider's regeneration: the opening is consistent with the chain."""

    def step_end(self, step, model, optimizer):
        if step == NUDGE[1]:
            with torch.no_grad():
                model.get_parameter(NUDGE[0]).view(-1)[7] += 1e-3
        return super().step_end(step, model, optimizer)


def _forge(model, active):
    layer = model.model.layers[FORGE[0]]

    def hook(_m, _a, out):
        if active():
            return (out[0] + 1e-3, *out[1:]) if isinstance(out, tuple) else out + 1e-3
        return None

    return layer.register_forward_hook(hook)


def _hooked(tmp_path_factory, base, name, hook):
    """Record and open with the cheat ``hook(model, active)`` installed at step FORGE[1] in training and in
    the provider's regeneration alike (before the tracker's hooks, so what it changes is what is committed)."""
    state = {"step": 0}

    class Step(transformers.TrainerCallback):
        def on_step_begin(self, args, s, control, **kwargs):
            state["step"] = s.global_step + 1

    class InOpening(opening.Regenerate):
        def install(self, model, trainer):
            self._step = 0
            hook(model, lambda: self._step == FORGE[1])
            super().install(model, trainer)

        def step_begin(self, step, model, optimizer):
            self._step = step
            super().step_begin(step, model, optimizer)

    return _cheat(tmp_path_factory, base, name, InOpening, callbacks=(Step(),),
                  prepare=lambda model: hook(model, lambda: state["step"] == FORGE[1]))  # fmt: skip


def _cheat(tmp_path_factory, base, name, forger, **record):
    work = tmp_path_factory.mktemp(name)
    path = cellkit.contract(work, base, BLOCKS)
    cellkit.record(path, work / "trace", **record)
    mp = pytest.MonkeyPatch()
    mp.setattr(opening, "Regenerate", forger)
    try:
        open_cells(load_contract(path), work / "trace", GRID, work / "open")
    finally:
        mp.undo()
    return work


def test_nudged_block_weights_fail_exactly_their_cell(tmp_path_factory, base):
    work = _cheat(tmp_path_factory, base, "nudge", _NudgeInOpening, callbacks=(_NudgeInTraining(),))
    results = _check(work, work / "open")
    failed = {k for k, r in results.items() if not r.ok}
    assert failed == {(3, 1)}, {k: r.detail for k, r in results.items() if not r.ok}
    assert "updated parameters" in results[(3, 1)].detail


def test_forged_boundary_activation_fails_the_cell_that_produces_it(tmp_path_factory, base):
    work = _hooked(tmp_path_factory, base, "forge", _forge)
    results = _check(work, work / "open")
    failed = {k for k, r in results.items() if not r.ok}
    assert failed == {(2, 0)}, {k: r.detail for k, r in results.items() if not r.ok}
    assert "output is not the committed boundary activation" in results[(2, 0)].detail
    report = verify_trace(work / "trace", work / "c.yaml", nonce=NONCE, windows=2)  # whole windows catch it too
    assert report.verdict == "FAIL" and any("cells digest differs" in f.reason for f in report.failures)


def _reseed(model, active):
    """The cheat: choose block 1's dropout masks (reseed where it starts) instead of drawing on."""

    def pre(_m, _a):
        if active():
            torch.manual_seed(1234)

    return model.model.layers[1].register_forward_pre_hook(pre)


def test_chosen_dropout_masks_fail_the_cell_before_them(tmp_path_factory, base):
    work = _hooked(tmp_path_factory, base, "reseed", _reseed)
    results = _check(work, work / "open")
    failed = {k for k, r in results.items() if not r.ok}
    assert failed == {(2, 0)}, {k: r.detail for k, r in results.items() if not r.ok}
    assert "RNG state where the block ends" in results[(2, 0)].detail


def test_unopened_cells_fail(honest, tmp_path):
    partial = tmp_path / "open"
    shutil.copytree(honest / "open", partial)
    (partial / opening.step_file(2, 1)).unlink()
    for name in (opening.step_file(4), opening.step_file(4, batch=True)):
        (partial / name).unlink()
    results = _check(honest, partial)
    failed = {k: r.detail for k, r in results.items() if not r.ok}
    assert set(failed) == {(2, 1), (4, 0), (4, 1), (4, 2)}
    assert all(d.startswith("cell_unopened") for d in failed.values())
    report = verify_trace(honest / "trace", honest / "c.yaml", nonce=NONCE, windows=0, openings=partial)
    assert report.verdict == "FAIL" and {f.check for f in report.failures} == {"cells"}


def test_every_tampered_opening_file_fails_never_errors(honest, tmp_path):
    """A byte flipped in the middle of any opening file FAILs the cells that read it (no exception)."""
    files = sorted(p.name for p in (honest / "open").iterdir() if p.name.startswith("step-00000003"))
    for name in files:
        bad = tmp_path / name.replace(".", "_")
        shutil.copytree(honest / "open", bad)
        blob = bytearray((bad / name).read_bytes())
        blob[len(blob) // 2 + 3] ^= 0x10
        (bad / name).write_bytes(bytes(blob))
        results = _check(honest, bad, [Cell(3, b) for b in range(3)])
        hit = {b for (s, b), r in results.items() if not r.ok}
        whole = not name.endswith(tuple(f"block-{b:03d}.safetensors" for b in range(3)))
        assert hit == ({0, 1, 2} if whole else {int(name[-15:-12])}), (name, {k: r.detail for k, r in results.items()})


def test_the_cli_round_trip(honest, tmp_path, capsys):
    """`aftune cells challenge` and `cells open` (provider), `aftune verify --openings` (client), `aftune plan`."""
    from aftune_hf.cli import main

    trace, contract = str(honest / "trace"), str(honest / "c.yaml")
    assert main(["cells", "challenge", trace, "--contract", contract, "--nonce", NONCE, "--cells", "3", "--json"]) == 0
    chosen = __import__("json").loads(capsys.readouterr().out)
    assert len(chosen) == 3 and all(set(x) == {"step", "block"} for x in chosen)
    out = tmp_path / "opening"
    assert main(["cells", "open", trace, "--contract", contract, "--nonce", NONCE, "--cells", "3", "--out", str(out)]) == 0
    assert "opened 3 cells" in capsys.readouterr().out
    code = main(["verify", trace, "--contract", contract, "--nonce", NONCE, "--windows", "0", "--openings", str(out),
                 "--cells", "3", "--quiet"])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 3 and "cell detection (3/12 cells)" in text and "INCONCLUSIVE" in text  # 3 of 12 < min_detection 0.9
    assert main(["verify", trace, "--contract", contract, "--nonce", "6b" * 16, "--windows", "0", "--openings", str(out),
                 "--cells", "3", "--quiet"]) == 1  # another nonce challenges other cells: those are not opened
    assert "cell_unopened" in capsys.readouterr().out
    assert main(["verify", trace, "--contract", contract, "--nonce", NONCE, "--openings", str(tmp_path / "typo")]) == 2
    assert "openings_not_found" in capsys.readouterr().err  # the client's mistake: a usage error, not the provider's FAIL
    assert main(["plan", "--steps", "1000", "--anchor-every", "10", "--bad-fraction", "0.1", "--model",
                 str(load_contract(contract).resolve(load_contract(contract).base_model.path)), "--layer-blocks", "0,1,2,3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "windows" in lines[0] and lines[-1].startswith("or 44 of 3000 cells (3 blocks;")


def test_an_opening_published_at_a_pinned_revision(honest, hub):
    """The provider publishes the opening with `aftune push` (the real huggingface_hub client against
    tests/hub_server.py, a local stand-in for the Hub); the client verifies it at that commit. A later
    commit that swaps a tensor file does not change what the pinned revision serves."""
    from aftune_hf.hub import push_trace

    fake, endpoint = hub
    pushed = push_trace(honest / "open", "provider/openings", endpoint=endpoint, token="hf_test")
    assert pushed.uri.startswith("hf://provider/openings@") and len(pushed.commit_sha) == 40
    report = verify_trace(honest / "trace", honest / "c.yaml", nonce=NONCE, windows=0, openings=pushed.uri, endpoint=endpoint)
    assert report.verdict == "PASS" and len(report.cells) == 12, report.summary()
    moved = honest.parent / "moved"
    shutil.copytree(honest / "open", moved, dirs_exist_ok=True)
    (moved / opening.step_file(2, 1)).write_bytes((moved / opening.step_file(3, 1)).read_bytes())
    later = push_trace(moved, "provider/openings", endpoint=endpoint, token="hf_test")
    assert later.commit_sha != pushed.commit_sha
    again = verify_trace(honest / "trace", honest / "c.yaml", nonce=NONCE, windows=0, openings=pushed.uri, endpoint=endpoint)
    assert again.verdict == "PASS"
    bad = verify_trace(honest / "trace", honest / "c.yaml", nonce=NONCE, windows=0, openings=later.uri, endpoint=endpoint)
    assert bad.verdict == "FAIL" and {(f.step, f.check) for f in bad.failures} == {(2, "cells")}, bad.summary()
