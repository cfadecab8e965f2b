"""Layer-block cells on jobs set up as a user would (issue 19): GPT-2 (learned positions, LayerNorm,
Conv1D, dropout 0.1 everywhere) from `aftune contract init` and the generic recipe, uneven blocks,
a head tied to the embedding. Every honest cell PASSes; a cheat on the tied tensor FAILs its cell;
a trainer whose loss is not the model's own is refused."""

from __future__ import annotations

import pytest
import torch
import transformers

from aftune_hf import audited_trainer
from aftune_hf.cells.check import check_cells
from aftune_hf.cells import opening
from aftune_hf.cells.opening import Cell, open_cells
from aftune_hf.contract import load_contract
from aftune_hf.errors import RecorderError
from aftune_hf.replay import build_recipe
from aftune_hf.trace import TraceReader
from tests import jobs

pytestmark = pytest.mark.slow
CELLS = {**jobs.SMALL, "training.max_steps": 4, "training.gradient_accumulation_steps": 2, "audit.layer_blocks": [0, 2, 3]}


@pytest.fixture(scope="module")
def gpt2_untied(tmp_path_factory):
    return jobs.make_gpt2(tmp_path_factory.mktemp("gpt2u") / "gpt2", n_layer=3, tie_word_embeddings=False)


def test_gpt2_every_cell_passes(gpt2_untied, tmp_path):
    path = jobs.init(tmp_path, gpt2_untied, jobs.DATASET, **CELLS)
    c = load_contract(path)
    audited_trainer(path, tmp_path / "out", tmp_path / "trace", disable_tqdm=True).train()
    grid = [Cell(s, b) for s in range(1, 5) for b in range(2)]
    open_cells(c, tmp_path / "trace", grid, tmp_path / "open")
    config = build_recipe(c, tmp_path / "v").model.config
    steps = TraceReader(tmp_path / "trace").check_integrity().steps()
    results = check_cells(c, steps, grid, tmp_path / "open", config)
    assert all(r.ok for r in results), [r for r in results if not r.ok]


def test_a_trainer_with_its_own_loss_is_refused(gpt2_untied, tmp_path, capsys):
    """trl's SFTTrainer trains on a loss it computes from log-probs, outside the model: cells would
    have to re-derive it; the contract refuses instead of FAILing an honest job later."""
    with pytest.raises(AssertionError):
        jobs.init(tmp_path, gpt2_untied, jobs.DATASET, "--trainer", "trl:SFTTrainer", **CELLS)
    assert "not with trainer trl:SFTTrainer" in capsys.readouterr().err


def test_a_loss_outside_the_model_stops_recording(gpt2_untied, tmp_path):
    """The generic guard behind that refusal: a Trainer subclass whose loss is not the model's output.loss."""
    class OwnLoss(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(**inputs)
            return out.logits.float().pow(2).mean()

    path = jobs.init(tmp_path, gpt2_untied, jobs.DATASET, **CELLS)
    trainer = audited_trainer(path, tmp_path / "out", tmp_path / "trace", disable_tqdm=True)
    trainer.__class__ = OwnLoss
    with pytest.raises(RecorderError, match="own loss was not back-propagated"):
        trainer.train()


class _NudgeEmbedding(transformers.TrainerCallback):
    """A cheat on the tied tensor: after step 2's update, move one entry of the shared embedding/head matrix."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == 2:
            with torch.no_grad():
                model.get_input_embeddings().weight.view(-1)[5] += 1e-3


class _NudgeInOpening(opening.Regenerate):
    def step_end(self, step, model, optimizer):
        if step == 2:
            with torch.no_grad():
                model.get_input_embeddings().weight.view(-1)[5] += 1e-3
        return super().step_end(step, model, optimizer)


@pytest.mark.parametrize("cheat", [False, True])
def test_gpt2_with_its_tied_head(tmp_path, cheat):
    """GPT-2 ties its head to the token embedding: the tensor's gradient is the sum of the last
    block's and block 0's contributions. The recorder commits the head's share per micro-batch (a
    hook on the autograd node that passes it on); the last block's cell recomputes that share, block
    0's cell adds it to its own and updates the tensor. Honest: every cell PASSes; a nudge of the
    shared tensor after step 2 FAILs exactly cell (2, 0)."""
    gpt2 = jobs.make_gpt2(tmp_path / "gpt2", n_layer=3)
    assert gpt2 and transformers.AutoConfig.from_pretrained(gpt2).tie_word_embeddings
    path = jobs.init(tmp_path, gpt2, jobs.DATASET, **CELLS)
    c = load_contract(path)
    audited_trainer(path, tmp_path / "out", tmp_path / "trace", disable_tqdm=True,
                    callbacks=(_NudgeEmbedding(),) if cheat else ()).train()  # fmt: skip
    grid = [Cell(s, b) for s in range(1, 5) for b in range(2)]
    mp = pytest.MonkeyPatch()
    if cheat:
        mp.setattr(opening, "Regenerate", _NudgeInOpening)
    try:
        open_cells(c, tmp_path / "trace", grid, tmp_path / "open")
    finally:
        mp.undo()
    config = build_recipe(c, tmp_path / "v").model.config
    steps = TraceReader(tmp_path / "trace").check_integrity().steps()
    failed = {(r.step, r.block): r.detail for r in check_cells(c, steps, grid, tmp_path / "open", config) if not r.ok}
    assert failed == ({(2, 0): failed.get((2, 0))} if cheat else {}), failed
    if cheat:
        assert "updated parameters" in failed[(2, 0)]
