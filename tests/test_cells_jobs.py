"""Layer-block cells on jobs set up as a user would (issue 19): GPT-2 (learned positions, LayerNorm,
Conv1D, dropout 0.1 everywhere) from `aftune contract init` and the generic recipe, uneven blocks,
with the stock Trainer and with trl's SFTTrainer. Every honest cell PASSes; a tied head is refused
before any step is run."""

from __future__ import annotations

import pytest
import transformers

from aftune_hf import audited_trainer
from aftune_hf.cells.check import check_cells
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


def test_a_tied_head_is_refused_before_training(tmp_path):
    gpt2 = jobs.make_gpt2(tmp_path / "gpt2", n_layer=3)  # GPT-2 ties its head to the token embedding
    path = jobs.init(tmp_path, gpt2, jobs.DATASET, **CELLS)
    trainer = audited_trainer(path, tmp_path / "out", tmp_path / "trace", disable_tqdm=True)
    with pytest.raises(RecorderError, match="tied embeddings"):
        trainer.train()
    assert trainer.state.global_step == 0
