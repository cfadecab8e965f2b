"""Recovery of the recorder (issue 16): resume picks a checkpoint the trace can continue from,
a Trainer checkpoint is never ahead of the chain, finalisation survives crashes. The SIGKILL
versions of these (random and fixed kill points, then the README's resume) are tests/test_crash.py."""

from __future__ import annotations

import time

import pytest
import transformers

from aftune_hf import AuditCallback
from aftune_hf.contract import load_contract
from aftune_hf.errors import RecorderError
from aftune_hf.recipes.causal_lm import build
from aftune_hf.trace import CHAIN, ROOT, TraceReader, TraceWriter, progress
from aftune_hf.trainer_checkpoints import set_aside
from aftune_hf.verify import verify_trace

pytestmark = pytest.mark.slow


class StopAt(transformers.TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _train(contract_path, out, trace, *, resume=None, callbacks=(), **overrides):
    contract = load_contract(contract_path)
    kw = dict(save_strategy="steps", save_steps=1, disable_tqdm=True, logging_steps=100) | overrides
    parts = build(contract, str(out), **kw)
    trainer = transformers.Trainer(**parts.trainer_kwargs(), callbacks=[AuditCallback(contract, trace), *callbacks])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _states(trace):
    return [r["state"] for r in TraceReader(trace).check_integrity().steps().values()]


def test_resume_true_skips_torn_and_uncommitted_checkpoints(write_contract, tmp_path):
    contract = write_contract(training={"max_steps": 6}, audit={"anchor_every": 2, "windows": 3})
    _train(contract, tmp_path / "ref-out", tmp_path / "ref")
    out, trace = tmp_path / "out", tmp_path / "t"
    _train(contract, out, trace, callbacks=[StopAt(5)])
    # a crash tore checkpoint-4 (the Trainer writes trainer_state.json last) and lost step 5's chain line,
    # so checkpoint-5 is ahead of the chain; resume_from_checkpoint=True alone would take checkpoint-5
    (out / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, "log_hi')
    lines = (trace / CHAIN).read_bytes().splitlines(keepends=True)
    (trace / CHAIN).write_bytes(b"".join(lines[:-1]) + lines[-1][:40])
    assert progress(trace).last_step == 4
    _train(contract, out, trace, resume=True)
    assert (out / "torn-checkpoint-4").is_dir() and (out / "uncommitted-checkpoint-5").is_dir()
    resumes = [e.record for e in TraceReader(trace).check_integrity().entries if e.record["kind"] == "resume"]
    assert [r["step"] for r in resumes] == [3]
    assert _states(trace) == _states(tmp_path / "ref")
    assert verify_trace(trace, contract, nonce="0123456789abcdef", windows=3).verdict == "PASS"


def test_set_aside_never_deletes_and_keeps_good_checkpoints(tmp_path):
    for step, state in ((1, '{"global_step": 1}'), (2, '{"global_step": 2}'), (3, '{"glob'), (4, '{"global_step": 4}')):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (tmp_path / "torn-checkpoint-3").mkdir()  # a name taken by an earlier crash
    moved = set_aside(tmp_path, last_committed=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-1", "checkpoint-2", "torn-checkpoint-3", "torn-checkpoint-3.1", "uncommitted-checkpoint-4"]
    assert len(moved) == 2 and (tmp_path / "torn-checkpoint-3.1" / "trainer_state.json").read_text() == '{"glob'


def test_an_epoch_save_waits_for_the_chain(write_contract, tmp_path, monkeypatch):
    """save_strategy="epoch" decides to save after the last step's on_step_end: the recorder must
    still commit that step before the Trainer writes the checkpoint (else a kill leaves it ahead)."""
    append = TraceWriter.append

    def slow_append(self, record):
        if record.get("kind") == "step":
            time.sleep(0.3)
        return append(self, record)

    monkeypatch.setattr(TraceWriter, "append", slow_append)
    seen = []

    class AtSave(transformers.TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            seen.append((state.global_step, progress(tmp_path / "t").last_step))

    contract = write_contract(training={"max_steps": 15}, audit={"anchor_every": 5})
    _train(contract, tmp_path / "out", tmp_path / "t", callbacks=[AtSave()], save_strategy="epoch")
    assert seen and seen[0][0] == 13 and all(step == committed for step, committed in seen), seen


@pytest.mark.parametrize("fault", ["card", "root"])
def test_a_failed_finalisation_is_sealed_by_running_again(write_contract, tmp_path, monkeypatch, fault):
    from aftune_hf.trace import writer as W

    contract = write_contract(training={"max_steps": 3}, audit={"anchor_every": 2, "windows": 2})
    write = W.atomic_write_bytes

    def failing(path, data, *a, **k):
        if path.name == {"card": "README.md", "root": ROOT}[fault]:
            raise OSError(28, "No space left on device")
        return write(path, data, *a, **k)

    monkeypatch.setattr(W, "atomic_write_bytes", failing)
    with pytest.raises(OSError):
        _train(contract, tmp_path / "out", tmp_path / "t")
    chain = (tmp_path / "t" / CHAIN).read_bytes()
    assert not (tmp_path / "t" / ROOT).exists()
    monkeypatch.setattr(W, "atomic_write_bytes", write)
    for resume in (True, None):
        with pytest.raises(RecorderError, match="trace_finished"):
            _train(contract, tmp_path / "out", tmp_path / "t", resume=resume)
    assert (tmp_path / "t" / CHAIN).read_bytes() == chain  # sealed as it was: no resume record, no extra step
    assert not (tmp_path / "out" / "checkpoint-4").exists()
    assert verify_trace(tmp_path / "t", contract, nonce="0011223300112233", windows=2).verdict == "PASS"


@pytest.fixture
def small_disk(tmp_path):
    """A real 128 KiB tmpfs (root and a mount namespace that allows it; skipped elsewhere)."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_loses_nothing_committed_and_the_readme_resume_continues(write_contract, tmp_path, small_disk):
    import subprocess

    contract = write_contract(training={"max_steps": 8}, audit={"anchor_every": 2, "windows": 4})
    _train(contract, tmp_path / "ref-out", tmp_path / "ref")
    reference = [e.record for e in TraceReader(tmp_path / "ref").check_integrity().entries]
    trace, out = small_disk / "t", tmp_path / "out"
    with pytest.raises((RecorderError, OSError)):  # ENOSPC, from the writer thread or the training thread
        _train(contract, out, trace)
    done = progress(trace)
    assert 0 <= done.last_step < 8 and not done.sealed
    chain = (trace / CHAIN).read_bytes()
    lines = chain.split(b"\n")
    assert chain.endswith(b"\n") and len(lines) - 1 == done.last_step + 1, "a torn or missing line"
    kept = [e.record for e in TraceReader(trace).entries()]
    assert kept == reference[: len(kept)]  # every committed step is still there, unchanged
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    _train(contract, out, trace, resume=True if any(out.glob("checkpoint-*")) else None)
    assert _states(trace) == _states(tmp_path / "ref")
    assert verify_trace(trace, contract, nonce="abababababababab" * 8, windows=4).verdict == "PASS"
