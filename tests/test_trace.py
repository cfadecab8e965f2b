"""The trace format: writer/reader round trip, anchors without pickle, and every refusal."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import safetensors.torch
import torch

from aftune_hf import digest as D
from aftune_hf import records as R
from aftune_hf.errors import (
    CommitmentError,
    ManifestMismatchError,
    PathSafetyError,
    RecorderError,
    ResourceLimitError,
    TraceFormatError,
    TraceLockedError,
    UnsafeContentError,
)
from aftune_hf.trace import (
    CHAIN,
    FORMAT_VERSION,
    HEADER,
    LOCK,
    ROOT,
    Limits,
    TraceReader,
    TraceWriter,
    anchor_path,
    checkpoint_path,
    schema_of,
)
from tests import tracekit


@pytest.fixture
def trace(tmp_path):
    root = tmp_path / "trace"
    tracekit.write_trace(root, steps=4, anchor_every=2)
    return root


def test_round_trip(trace):
    reader = TraceReader(trace)
    integrity = reader.check_integrity()
    assert integrity.num_steps == 4
    steps = integrity.steps()
    assert sorted(steps) == [0, 1, 2, 3, 4]
    schema = reader.schema()
    for s in (1, 2, 3, 4):
        ck = reader.checkpoint(s, schema)
        assert D.state_digest(ck).hex() == steps[s]["state"]
    for s in (0, 2, 4):
        assert reader.anchor(s, schema).digest().hex() == steps[s]["anchor"]
    assert steps[3]["anchor"] is None
    assert reader.header()["contract_digest"] == tracekit.CONTRACT_DIGEST.hex()
    assert integrity.root["final_state"] == steps[4]["state"]
    lines = (trace / CHAIN).read_bytes().splitlines()
    assert [json.loads(line)["record"] for line in lines] == [dict(e.record) for e in integrity.entries]


def test_anchor_resumes_bit_exact_without_pickle(trace):
    """Optimizer, scheduler and RNG (dropout!) restored from safetensors+JSON continue exactly."""
    reader = TraceReader(trace)
    anchor = reader.anchor(2, reader.schema())
    model, opt, sched = tracekit.build(seed=123)  # different init: everything must come from the anchor
    model.load_state_dict({**model.state_dict(), **anchor.params})
    opt.load_state_dict(anchor.optimizer_state_dict())
    sched.load_state_dict(anchor.scheduler_state())
    rng = anchor.rng_state()
    import random

    import numpy as np

    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["cpu"])
    for step in (3, 4):
        tracekit.train_step(model, opt, sched, step)
        recorded = reader.checkpoint(step)
        assert all(torch.equal(p, recorded[n]) for n, p in model.named_parameters())
    assert anchor.trainer_state() == {"global_step": 2}


def test_safetensors_output_is_byte_stable(tmp_path):
    t = {"b": torch.randn(3, 4), "a": torch.arange(5)}
    from aftune_hf.safeio import atomic_save_safetensors

    atomic_save_safetensors(tmp_path / "1.safetensors", t, {"format": "pt"})
    atomic_save_safetensors(tmp_path / "2.safetensors", dict(reversed(list(t.items()))), {"format": "pt"})
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()


# --- refusals: each builds the bad file and expects a specific error -----------------------------


def _rewrite_json(path, fn):
    obj = json.loads(path.read_bytes())
    fn(obj)
    path.write_bytes(D.canonical_json(obj))


def test_pickle_file_refused_unopened(trace):
    (trace / "optimizer.pt").write_bytes(b"\x80\x04 not even opened")
    with pytest.raises(UnsafeContentError, match="pickle_not_allowed"):
        TraceReader(trace)
    os.remove(trace / "optimizer.pt")
    (trace / "checkpoints" / "rng_state.pth").write_bytes(b"x")
    with pytest.raises(UnsafeContentError):
        TraceReader(trace)


@pytest.mark.parametrize("kind", ["file", "dir", "outside"])
def test_symlinks_refused(trace, tmp_path, kind):
    if kind == "file":
        os.symlink(trace / HEADER, trace / "link.json")
    elif kind == "dir":
        os.symlink(trace / "checkpoints", trace / "more")
    else:
        (trace / checkpoint_path(1)).unlink()
        os.symlink("/etc/passwd", trace / checkpoint_path(1))
    with pytest.raises(PathSafetyError, match="symlink"):
        TraceReader(trace)


def test_special_and_hardlinked_files_refused(trace):
    os.mkfifo(trace / "pipe")
    with pytest.raises(PathSafetyError, match="special_file"):
        TraceReader(trace)
    os.remove(trace / "pipe")
    os.link(trace / HEADER, trace / "copy.json")
    with pytest.raises(PathSafetyError, match="hardlink"):
        TraceReader(trace)


@pytest.mark.parametrize("name", ["a b.json", "x:y.json", "checkpoints/a\u00e9.safetensors"])
def test_bad_file_names_refused(trace, name):
    target = trace / name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"{}")
    except OSError:
        pytest.skip("filesystem refuses the name")
    with pytest.raises(PathSafetyError):
        TraceReader(trace)


def test_too_deep_and_too_many_files(trace):
    deep = trace / "a" / "b" / "c" / "d"
    deep.mkdir(parents=True)
    (deep / "x.json").write_bytes(b"{}")
    with pytest.raises(PathSafetyError, match="too_deep"):
        TraceReader(trace)
    shutil.rmtree(trace / "a")
    with pytest.raises(ResourceLimitError, match="too_many_files"):
        TraceReader(trace, limits=Limits(max_files=5))


def test_unknown_format_version_refused(trace):
    _rewrite_json(trace / HEADER, lambda h: h.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(TraceFormatError, match="format_version"):
        TraceReader(trace).header()


def test_oversized_json_refused_before_reading(trace):
    with pytest.raises(ResourceLimitError, match="file_too_large"):
        TraceReader(trace, limits=Limits(max_json_bytes=100)).header()


def test_duplicate_json_keys_refused(trace):
    data = (trace / HEADER).read_bytes()
    (trace / HEADER).write_bytes(data[:-1] + b',"run_id":"other"}')
    with pytest.raises(TraceFormatError, match="duplicate_key"):
        TraceReader(trace).header()


def test_oversized_safetensors_header_refused(trace):
    blob = (trace / checkpoint_path(1)).read_bytes()
    (trace / checkpoint_path(1)).write_bytes((10 * 2**30).to_bytes(8, "little") + blob[8:])
    with pytest.raises(TraceFormatError, match="header_too_large"):
        TraceReader(trace).checkpoint(1)


def test_duplicate_tensor_names_refused(trace):
    hdr = '{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    (trace / checkpoint_path(2)).write_bytes(len(hdr).to_bytes(8, "little") + hdr.encode() + b"\0" * 4)
    with pytest.raises(TraceFormatError, match="duplicate_key"):
        TraceReader(trace).checkpoint(2)


@pytest.mark.parametrize("change", ["extra", "missing", "shape", "dtype"])
def test_tensor_schema_enforced(trace, change):
    reader = TraceReader(trace)
    schema = reader.schema()
    tensors = reader.checkpoint(1, schema)
    name = sorted(tensors)[0]
    if change == "extra":
        tensors["smuggled"] = torch.zeros(1)
    elif change == "missing":
        tensors.pop(name)
    elif change == "shape":
        tensors[name] = torch.zeros(tensors[name].numel() + 1)
    else:
        tensors[name] = tensors[name].double()
    safetensors.torch.save_file(tensors, trace / checkpoint_path(1), metadata={"format": "pt"})
    with pytest.raises(ManifestMismatchError) as e:
        TraceReader(trace).checkpoint(1, schema)
    assert e.value.code == {"extra": "tensor_extra", "missing": "tensor_missing"}.get(change, "tensor_schema")


def test_extra_and_missing_files(trace):
    (trace / "notes.json").write_bytes(b"{}")
    with pytest.raises(ManifestMismatchError, match="extra_file"):
        TraceReader(trace).check_integrity()
    (trace / "notes.json").unlink()
    (trace / checkpoint_path(3)).unlink()
    with pytest.raises(ManifestMismatchError, match="missing_file"):
        TraceReader(trace).check_integrity()
    (trace / ".gitattributes").write_text("*.safetensors filter=lfs\n")  # the Hub adds this; ignored


def test_gitattributes_from_the_hub_is_ignored(trace):
    (trace / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    assert TraceReader(trace).check_integrity().num_steps == 4


def test_edited_checkpoint_detected(trace):
    reader = TraceReader(trace)
    t = reader.checkpoint(2)
    name = sorted(t)[0]
    t[name] = t[name] + 1e-6
    safetensors.torch.save_file(t, trace / checkpoint_path(2), metadata={"format": "pt"})
    with pytest.raises(ManifestMismatchError, match="hash_mismatch"):
        TraceReader(trace).check_integrity()


def test_edited_chain_record_detected(trace):
    lines = (trace / CHAIN).read_bytes().splitlines(keepends=True)
    obj = json.loads(lines[2])
    obj["record"]["lr"] = D.encode_float(0.5)
    lines[2] = D.canonical_json(obj) + b"\n"
    (trace / CHAIN).write_bytes(b"".join(lines))
    with pytest.raises(CommitmentError, match="chain_break"):
        TraceReader(trace).check_integrity()


def test_recomputed_but_reordered_chain_detected(trace):
    """Swapping two records and recomputing their hashes still breaks the step sequence."""
    entries = TraceReader(trace).entries()
    records = [dict(e.record) for e in entries]
    records[1], records[2] = records[2], records[1]
    head, lines = D.chain_start(tracekit.CONTRACT_DIGEST, "tracekit-run"), []
    for i, rec in enumerate(records, 1):
        e = R.link(head, i, rec)
        head = e.chain
        lines.append(D.canonical_json(e.to_json()) + b"\n")
    (trace / CHAIN).write_bytes(b"".join(lines))
    with pytest.raises(CommitmentError, match="duplicate_step|step_gap"):
        TraceReader(trace).check_integrity()


def test_torn_chain_refused(trace):
    with open(trace / CHAIN, "ab") as f:
        f.write(b'{"i":6,"rec')
    with pytest.raises(TraceFormatError, match="chain_torn"):
        TraceReader(trace).check_integrity()


@pytest.mark.parametrize("field,value", [("num_steps", 3), ("final_state", "00" * 32), ("trace_root", "11" * 32)])
def test_edited_root_detected(trace, field, value):
    _rewrite_json(trace / ROOT, lambda r: r.update({field: value}))
    with pytest.raises(CommitmentError, match="root_mismatch"):
        TraceReader(trace).check_integrity()


def test_malformed_anchor_meta_refused(trace):
    _rewrite_json(trace / anchor_path(2, "meta"), lambda m: m.update(extra=1))
    with pytest.raises(TraceFormatError, match="anchor_invalid"):
        TraceReader(trace).anchor(2)


# --- writer: locking, crash recovery -------------------------------------------------------------


def test_second_writer_is_locked_out(tmp_path):
    w, _ = tracekit.write_trace(tmp_path / "t", steps=2, finalize=False)
    with pytest.raises(TraceLockedError):
        TraceWriter.resume(tmp_path / "t")
    w.close()
    with pytest.raises(RecorderError, match="trace_exists"):
        TraceWriter.create(tmp_path / "t", contract_digest=bytes(32), contract={}, schema={})


def test_create_clears_only_what_a_start_up_crash_left(tmp_path):
    """A kill before the first record leaves a header, temp files and step-0 anchor files: a new
    run clears them. Anything else (someone's files, a committed record) is never deleted."""
    root = tmp_path / "t"
    w, _ = tracekit.write_trace(root, steps=1, finalize=False)
    w.close()
    (root / CHAIN).write_bytes((root / CHAIN).read_bytes()[:30])  # the start record torn: nothing committed
    (root / ".aftune_trace.json.tmp-1").write_bytes(b"x")
    w = TraceWriter.create(root, contract_digest=bytes(32), contract={}, schema={})
    assert sorted(p.name for p in root.iterdir()) == [".aftune.lock", HEADER]
    w.close()
    other = tmp_path / "home"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RecorderError, match="trace_exists"):
        TraceWriter.create(other, contract_digest=bytes(32), contract={}, schema={})
    assert (other / "notes.txt").read_text() == "mine" and not (other / LOCK).exists()


def test_resume_after_crash_cleans_torn_state(tmp_path, capfd):
    root = tmp_path / "t"
    w, model = tracekit.write_trace(root, steps=3, finalize=False)
    committed = (root / CHAIN).read_bytes()
    # simulate a crash mid-step 4: a checkpoint written, a temp file, a torn chain line, stale lock
    w.write_checkpoint(4, tracekit.params(model))
    (root / "checkpoints" / ".step-00000005.safetensors.tmp-abc").write_bytes(b"partial")
    with open(root / CHAIN, "ab") as f:
        f.write(b'{"i":5,"record":{"kind"')
    os.close(w._lock.fd)  # the process died: the kernel drops its lock, the lock file stays behind
    (root / ".aftune.lock").write_text("999999999")  # with a dead pid in it
    w2 = TraceWriter.resume(root)
    assert (root / CHAIN).read_bytes() == committed
    assert not (root / checkpoint_path(4)).exists()
    assert not list(root.rglob("*.tmp-*"))
    assert w2.last_step == 3
    w2.append(R.resume_record(step=3, reason="test crash"))
    capfd.readouterr()
    w2.finalize("card", D.state_digest(tracekit.params(model)), progress=True)
    assert "sealing trace" in capfd.readouterr().err  # progress while every file is hashed into root.json
    integrity = TraceReader(root).check_integrity()
    assert integrity.num_steps == 3 and integrity.entries[-1].record["kind"] == "resume"


def test_writer_refuses_invalid_records(tmp_path):
    w = TraceWriter.create(tmp_path / "t", contract_digest=bytes(32), contract={}, schema={})
    with pytest.raises(TraceFormatError):
        w.append({"kind": "step", "step": 1})
    with pytest.raises(TraceFormatError):
        w.append(R.start_record(state=b"\0" * 31, anchor=bytes(32)))


def test_schema_of():
    assert schema_of({"w": torch.zeros(2, 3, dtype=torch.bfloat16)}) == {"w": ("BF16", (2, 3))}


def test_disk_full_on_chain_append_keeps_earlier_steps(tmp_path, monkeypatch):
    """R6: ENOSPC while committing a record raises RecorderError; the chain keeps what was committed."""
    import aftune_hf.trace.writer as W

    w, model = tracekit.write_trace(tmp_path / "t", steps=2, finalize=False)
    before = (tmp_path / "t" / CHAIN).read_bytes()

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(W.os, "write", full)
    with pytest.raises(RecorderError, match="No space left"):
        w.append(R.resume_record(step=2, reason="x"))
    monkeypatch.undo()
    assert (tmp_path / "t" / CHAIN).read_bytes() == before and len(w.entries) == 3


def test_json_true_is_not_the_version_one(trace):
    """Found by the resealing fuzzer: `true == 1` in Python, so root.json's protocol_version `true`
    (trace root recomputed) passed; versions must be integers."""
    from aftune_hf import digest as D

    def edit(r):
        r["protocol_version"] = True
        r["trace_root"] = D.trace_root({k: v for k, v in r.items() if k != "trace_root"}).hex()

    _rewrite_json(trace / ROOT, edit)
    with pytest.raises(CommitmentError, match="protocol_version"):
        TraceReader(trace).check_integrity()
    _rewrite_json(trace / HEADER, lambda h: h.update(protocol_version=True))
    with pytest.raises(TraceFormatError, match="protocol"):
        TraceReader(trace).header()



def _race(root: str, barrier, results) -> None:
    from pathlib import Path

    from aftune_hf.trace.writer import _Lock

    barrier.wait()
    try:
        lock = _Lock.acquire(Path(root))
    except TraceLockedError:
        results.put("lost")
        return
    results.put("won")
    import time

    time.sleep(0.3)  # hold it while the others try
    lock.release()


def test_a_stale_lock_is_taken_over_by_exactly_one_process(tmp_path):
    """Found by an independent run: two processes finding the same dead holder's lock both acquired
    it (2-16 of 200 trials). With flock the kernel decides: one winner every time."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    for trial in range(12):
        root = tmp_path / f"t{trial}"
        root.mkdir()
        (root / ".aftune.lock").write_text("999999999")  # a dead holder's lock
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(str(root), barrier, results)) for _ in range(4)]
        for pr in procs:
            pr.start()
        for pr in procs:
            pr.join(30)
        outcomes = sorted(results.get(timeout=5) for _ in procs)
        assert outcomes == ["lost", "lost", "lost", "won"], (trial, outcomes)
        assert not (root / ".aftune.lock").exists()  # released cleanly


def test_layout_shards_steps_into_folders_of_a_thousand():
    """Format 4: the Hub keeps < 10k entries per folder, so steps live in folders of SHARD_STEPS."""
    from aftune_hf.trace import anchor_path, checkpoint_path, file_count, step_of_path

    assert checkpoint_path(1234) == "checkpoints/00001/step-00001234.safetensors"
    assert anchor_path(20000, "meta") == "anchors/00020/step-00020000/anchor.json"
    assert anchor_path(999, "rng") == "anchors/00000/step-00000999/rng.safetensors"
    for s in (0, 7, 999, 1000, 19999, 20000):
        assert step_of_path(checkpoint_path(s)) == s and step_of_path(anchor_path(s, "params")) == s
    assert step_of_path("checkpoints/00000/step-00001234.safetensors") is None  # in another step's folder
    assert step_of_path("checkpoints/step-00000005.safetensors") is None  # format 3
    assert file_count(20000, 10, 10) == 4 + 2000 + 2001 * 4
    assert file_count(12, 4, 1) == 4 + 12 + 4 * 4 and file_count(10, 4, 3) == 4 + 4 + 4 * 4


def test_a_lazy_reader_refuses_an_oversized_listing_before_downloading(tmp_path):
    """Read from the Hub, a file is fetched only when opened, and never when its listed size is
    already over the bound for what it is (a 1 TiB "header" must not be streamed first)."""
    from aftune_hf.errors import ResourceLimitError, UnsafeContentError
    from aftune_hf.trace import HEADER, TraceReader

    class Listing:
        def __init__(self, sizes):
            self.dest, self.sizes, self.fetched, self.asked = tmp_path, sizes, {}, []

        def fetch(self, rel):
            self.asked.append(rel)
            raise AssertionError("must not be fetched")

    remote = Listing({HEADER: 1 << 40, "chain.jsonl": 10})
    reader = TraceReader(remote=remote)
    with pytest.raises(ResourceLimitError, match="file_too_large"):
        reader.header()
    assert remote.asked == []
    with pytest.raises(UnsafeContentError, match="pickle_not_allowed"):
        TraceReader(remote=Listing({HEADER: 10, "anchors/x.pt": 10}))


def test_an_inference_log_keeps_at_most_1000_calls_or_roots_per_folder(tmp_path):
    """Call and root files sit in folders of 1 000 (the Hub's per-folder advice is ~10 000 entries):
    1 001 calls and two published roots read back whole, the newest root checked."""
    from aftune_hf.trace.inference import InferenceLogReader, InferenceLogWriter, call_path, root_path

    log = InferenceLogWriter(tmp_path / "log")
    config = {**dict.fromkeys(R.CALL_CONFIG_KEYS), "do_sample": False, "eos_token_id": 2, "max_new_tokens": 1}
    weights = {"params": "00" * 32, "model": "00" * 32, "adapter": None}
    row = {"prompt.0": torch.tensor([5, 6]), "output.0": torch.tensor([2]), "act_value.0": torch.tensor([0.5])}
    for n in range(1, 1002):
        log.append(row, rows=1, config=config, weights=weights, seed=None)
        if n in (999, 1001):
            log.publish()
    log.close()
    folders = {p.parent.relative_to(tmp_path / "log").as_posix() for p in (tmp_path / "log").rglob("*.*") if p.parent.name != "log"}
    assert folders == {"calls/00000", "calls/00001", "roots/00000", "roots/00001"}
    assert [len(list((tmp_path / "log" / f).iterdir())) for f in sorted(folders)] == [999, 2, 1, 1]  # calls 1-999, 1000-1001; roots
    assert call_path(999).startswith("calls/00000/") and call_path(1000).startswith("calls/00001/")
    reader = InferenceLogReader(tmp_path / "log")
    integrity = reader.check_integrity()
    assert integrity.num_calls == 1001 and (tmp_path / "log" / root_path(1001)).exists()
    assert reader.call_tensors(integrity.entries[-1])["act_value.0"].tolist() == [0.5]
