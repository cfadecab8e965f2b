"""AuditCallback on real Trainer runs: LoRA and full fine-tune, GA 2, dropout, crash + resume."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
import transformers

from aftune_hf import AuditCallback
from aftune_hf import digest as D
from aftune_hf.contract import load_contract
from aftune_hf.errors import ContractViolationError, RecorderError
from aftune_hf.recipes.causal_lm import build
from aftune_hf.trace import CHAIN, TraceReader, checkpoint_path
from tests.conftest import REPO

pytestmark = pytest.mark.slow


class SpyTrainer(transformers.Trainer):
    """Captures micro-batches independently of the callback (the research note's training_step override)."""

    seen: list

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append((self.state.global_step + 1, D.batch_digest(inputs).hex()))
        return super().training_step(model, inputs, num_items_in_batch)


def record(contract_path, tmp_path, name="trace", trainer_cls=transformers.Trainer, callback=None, **overrides):
    contract = load_contract(contract_path)
    parts = build(contract, str(tmp_path / f"out-{name}"), disable_tqdm=True, logging_steps=100, **overrides)
    cb = AuditCallback(contract, tmp_path / name, **(callback or {}))
    trainer = trainer_cls(**parts.trainer_kwargs(), callbacks=[cb])
    if trainer_cls is SpyTrainer:
        trainer.seen = []
    trainer.train()
    return trainer, cb, tmp_path / name


@pytest.mark.parametrize("template", ["tiny-lora", "tiny-full"])
def test_records_every_step_of_a_real_run(write_contract, tmp_path, template):
    path = write_contract(template, training={"max_steps": 6}, audit={"anchor_every": 4})
    contract = load_contract(path)
    trainer, cb, trace = record(path, tmp_path, trainer_cls=SpyTrainer)
    reader = TraceReader(trace)
    integrity = reader.check_integrity()
    assert integrity.num_steps == 6 and integrity.trace_root.hex() == cb.root["trace_root"]
    steps = integrity.steps()
    # micro-batches: the hook saw exactly what training_step received, GA=2 per step
    seen = {s: [bytes.fromhex(h) for t, h in trainer.seen if t == s] for s in range(1, 7)}
    assert len(trainer.seen) == 12 and all(len(b) == 2 for b in seen.values())
    assert all(steps[s]["data"] == D.step_data_digest([seen[s]]).hex() for s in range(1, 7))
    # anchors at 0, 4 and the final step; checkpoints per policy; states recompute
    assert [s for s, r in steps.items() if r["anchor"]] == [0, 4, 6]
    every = contract.audit.checkpoint_every
    assert [s for s in range(1, 7) if steps[s]["checkpoint"]] == [s for s in range(1, 7) if s % every == 0 or s == 6]
    schema = reader.schema()
    for s in range(1, 7):
        if steps[s]["checkpoint"]:
            assert D.state_digest(reader.checkpoint(s, schema)).hex() == steps[s]["state"]
        assert steps[s]["num_items"] > 0 and D.decode_float(steps[s]["loss"]) > 0
    for s in (0, 4, 6):
        anchor = reader.anchor(s, schema)
        assert anchor.digest().hex() == steps[s]["anchor"]
        assert D.state_digest(anchor.params).hex() == steps[s]["state"]
    final = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert integrity.root["final_state"] == D.state_digest(final).hex()
    # the lr committed for step s is the one the scheduler applied at that step (warmup from 0)
    assert D.decode_float(steps[1]["lr"]) == 0.0 and D.decode_float(steps[3]["lr"]) > 0
    import yaml

    card = yaml.safe_load((trace / "README.md").read_text().split("---")[1])
    assert card["library_name"] == "aftune_hf" and "audit-trace" in card["tags"]
    names = list(reader.schema())
    if template == "tiny-lora":
        assert names and all("lora_" in n for n in names)
    else:
        assert len(names) == len(list(trainer.model.parameters()))


def test_recording_does_not_change_training(write_contract, tmp_path):
    """The callback observes only: the same run with and without it ends bit-identical."""
    path = write_contract(training={"max_steps": 4})
    audited, _, _ = record(path, tmp_path)
    contract = load_contract(path)
    plain = transformers.Trainer(**build(contract, str(tmp_path / "plain"), disable_tqdm=True).trainer_kwargs())
    plain.train()
    a = dict(audited.model.named_parameters())
    assert all(torch.equal(p, a[n]) for n, p in plain.model.named_parameters())


@pytest.mark.parametrize(
    "change,field",
    [
        ("lr", "training.learning_rate"),
        ("rank", "peft.r"),
        ("base", "base_model.digest"),
        ("full", "peft"),
        ("pad", "training.padding.pad_to_multiple_of"),
    ],
)
def test_contract_mismatch_refuses_to_record(write_contract, tmp_path, change, field, base_model_dir):
    path = write_contract(training={"max_steps": 2})
    contract = load_contract(path)
    if change == "rank":
        parts = build(load_contract(write_contract(name="r2.yaml", peft={"r": 2})), str(tmp_path / "o"))
    elif change == "full":
        parts = build(load_contract(write_contract("tiny-full", name="full.yaml", training={"max_steps": 2})), str(tmp_path / "o"))
    elif change == "pad":
        tp = write_contract(name="p.yaml", training={"max_steps": 2, "padding": {"side": "right", "max_length": 96, "pad_to_multiple_of": 16}})
        parts = build(load_contract(tp), str(tmp_path / "o"))
    else:
        parts = build(contract, str(tmp_path / "o"))
    if change == "lr":
        parts = dataclasses.replace(parts, args=dataclasses.replace(parts.args, learning_rate=5e-4))
    if change == "base":
        with torch.no_grad():
            next(parts.model.get_base_model().parameters()).add_(1e-3)
    trainer = transformers.Trainer(**parts.trainer_kwargs(), callbacks=[AuditCallback(contract, tmp_path / "t")])
    with pytest.raises(ContractViolationError) as e:
        trainer.train()
    assert field in str(e.value)
    assert not (tmp_path / "t" / CHAIN).exists()
    assert trainer.state.global_step == 0


def test_background_write_failure_stops_training(write_contract, tmp_path, monkeypatch):
    from aftune_hf.trace import TraceWriter

    path = write_contract(training={"max_steps": 6})
    real = TraceWriter.stage_checkpoint

    def failing(self, step, tensors):
        if step == 3:
            raise RecorderError("write_failed", "No space left on device")
        return real(self, step, tensors)

    monkeypatch.setattr(TraceWriter, "stage_checkpoint", failing)
    with pytest.raises(RecorderError, match="No space left"):
        record(path, tmp_path)
    lines = (tmp_path / "trace" / CHAIN).read_bytes().splitlines()
    assert len(lines) == 3  # start + steps 1, 2: earlier steps intact, nothing for step 3
    assert not (tmp_path / "trace" / ".aftune.lock").exists()


def test_existing_trace_is_not_overwritten(write_contract, tmp_path):
    path = write_contract(training={"max_steps": 2})
    record(path, tmp_path)
    with pytest.raises(RecorderError, match="trace_finished"):  # (tests/test_crash.py: no byte changes)
        record(path, tmp_path)


def _run_child(contract, trace, out, *, resume=False, kill_after=None, sleep=0.15):
    cmd = [sys.executable, str(REPO / "tests" / "record_child.py"), str(contract), str(trace), str(out), "--sleep", str(sleep)]
    if resume:
        cmd.append("--resume")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = []
    for line in proc.stdout:
        log.append(line)
        if kill_after is not None and line.strip() == f"STEP {kill_after}":
            # land somewhere inside the next step, including mid-write
            import time

            time.sleep(random.uniform(0.0, sleep + 0.05))
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=300)
    return proc.returncode, "".join(log)


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_then_resume_keeps_the_chain_whole(write_contract, tmp_path, seed):
    random.seed(seed)
    path = write_contract(training={"max_steps": 8}, audit={"anchor_every": 3})
    ref_code, ref_log = _run_child(path, tmp_path / "ref", tmp_path / "ref-out", sleep=0.0)
    assert ref_code == 0, ref_log
    kill_at = random.randint(1, 6)
    code, log = _run_child(path, tmp_path / "t", tmp_path / "out", kill_after=kill_at)
    assert code == -signal.SIGKILL, log
    code, log = _run_child(path, tmp_path / "t", tmp_path / "out", resume=True, sleep=0.0)
    assert code == 0, log
    integrity = TraceReader(tmp_path / "t").check_integrity()
    kinds = [e.record["kind"] for e in integrity.entries]
    steps = [e.record["step"] for e in integrity.entries if e.record["kind"] == "step"]
    assert steps == list(range(1, 9)) and kinds.count("resume") == 1
    ref = TraceReader(tmp_path / "ref").check_integrity()
    # the resumed run reproduced the uninterrupted one bit for bit
    assert integrity.root["final_state"] == ref.root["final_state"]
    assert [r["state"] for r in integrity.steps().values()] == [r["state"] for r in ref.steps().values()]
    reader = TraceReader(tmp_path / "t")
    assert D.state_digest(reader.checkpoint(8)).hex() == integrity.root["final_state"]
    assert checkpoint_path(8) in integrity.root["files"]


def test_sft_trainer_under_a_trainer_contract_is_refused(write_contract, tmp_path):
    """The verifier replays with the contract's trainer class; recording trl.SFTTrainer under a contract
    that names transformers.Trainer would be an honest run reported as cheating, so it is refused."""
    trl = pytest.importorskip("trl")

    contract = load_contract(write_contract(training={"max_steps": 3}))
    parts = build(contract, str(tmp_path / "o"))
    cfg = trl.SFTConfig(output_dir=str(tmp_path / "o"), **contract.training_arguments_kwargs(), report_to="none",
                        max_length=96, disable_tqdm=True)  # fmt: skip
    trainer = trl.SFTTrainer(model=parts.model, args=cfg, train_dataset=parts.train_dataset,
                             data_collator=parts.data_collator, processing_class=parts.processing_class,
                             callbacks=[AuditCallback(contract, tmp_path / "t")])  # fmt: skip
    with pytest.raises(ContractViolationError, match="trainer: contract='transformers:Trainer', live='trl"):
        trainer.train()


def test_bf16_autocast_run_is_recorded(write_contract, tmp_path):
    path = write_contract(training={"max_steps": 3, "precision": "bf16"})
    trainer, cb, trace = record(path, tmp_path)
    assert trainer.args.bf16 and TraceReader(trace).check_integrity().num_steps == 3


def test_writer_reads_cpu_tensors_in_place():
    """On the CPU the writer hashes and writes the live tensors themselves (no copy; the training
    thread waits for it before the next optimizer step); only GPU tensors are copied to the host."""
    from aftune_hf.live import on_host

    live = {"a": torch.ones(3), "b": torch.zeros(2, 2)}
    host, copied = on_host(live)
    assert not copied and all(host[n] is live[n] or host[n].data_ptr() == live[n].data_ptr() for n in live)


def test_device_hashed_steps_commit_the_same_digests(write_contract, tmp_path, monkeypatch):
    """``device_hash=True`` (the GPU default) hashes the steps without a checkpoint or anchor through
    aftune_hf.device_blake3 in place; the chain must be byte-identical to host hashing."""
    from aftune_hf import device_blake3

    calls = []
    real = device_blake3.state_digest
    monkeypatch.setattr(device_blake3, "state_digest", lambda t, **kw: calls.append(len(t)) or real(t, **kw))
    path = write_contract("tiny-full", training={"max_steps": 6}, audit={"anchor_every": 3, "checkpoint_every": 2})
    record(path, tmp_path, name="host", callback={"device_hash": False})
    assert calls == []
    record(path, tmp_path, name="device", callback={"device_hash": True})
    assert len(calls) == 2  # steps 1 and 5: no checkpoint (2, 4, 6), no anchor (3, 6)
    host, device = ([json.loads(x)["record"] for x in (tmp_path / n / CHAIN).read_text().splitlines()] for n in ("host", "device"))
    assert len(host) == 7 and all(r["state"] for r in host)
    assert host == device  # every field of every record (the chain values differ: random run ids)


def test_fsdp_sharded_parameters_are_refused_before_anything_is_written(write_contract, tmp_path):
    """A model sharded with ``fully_shard`` by hand under a contract that does not declare FSDP: its
    parameters are DTensor shards of a job the contract does not describe, so the recorder fails
    closed (FSDP2 under a contract that declares it: tests/test_fsdp.py)."""
    contract = write_contract("tiny-full", training={"max_steps": 2})
    trace = tmp_path / "trace"
    p = subprocess.run([sys.executable, str(REPO / "tests" / "sharded_record.py"), str(contract), str(trace)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert p.returncode == 3 and "REFUSED unsupported_sharding" in p.stdout, p.stdout + p.stderr[-2000:]
    assert not trace.exists() or not any(trace.iterdir())


def test_fsdp_training_arguments_are_refused(write_contract, tmp_path):
    from aftune_hf.recipes.common import argument_differences

    contract = load_contract(write_contract("tiny-full"))
    args = transformers.TrainingArguments(str(tmp_path / "o"), use_cpu=True, report_to=[])
    assert argument_differences(contract, args) == []
    args.fsdp, args.fsdp_config = "full_shard", {"fsdp_version": 2}
    diffs = argument_differences(contract, args)
    assert any("fsdp" in d for d in diffs) and any("fsdp_config" in d for d in diffs)
