"""FSDP2 recording: every rank hashes and writes its own shards, the main process joins 32-byte pieces
into the standard digests, and one process verifies the unsharded equivalent (tolerance mode).

The digest join is checked against ``tensor_digest`` on random shapes and splits; the reader's join
of rank files refuses a split that is not FSDP2's; two real CPU processes under ``accelerate launch``
train a real Trainer with accelerate's FSDP2 (tests/fsdp_cpu.py lets accelerate do FSDP on CPU) and
record it: honest PASS, a provider who edits one rank's shard FAILs, a forged rank file FAILs.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from aftune_hf import digest as D
from aftune_hf.contract import load_contract
from aftune_hf.errors import ManifestMismatchError
from aftune_hf.sharded_digest import Pieces, decode, encode, join_digest, local_pieces, shard_rows
from aftune_hf.trace import ROOT, TraceReader, anchor_files, checkpoint_files, checkpoint_path, file_count, step_of_path
from aftune_hf.trace.reader import merge_shards


def _pieces(t: torch.Tensor, world: int) -> list[Pieces]:
    out = []
    for r in range(world):
        a, b = shard_rows(t.shape[0], world, r)
        out.append(decode(encode(local_pieces({"w": t[a:b]}, {"w": (t.dtype, tuple(t.shape))}, a)))["w"])
    return out


def test_joined_shard_pieces_are_the_tensor_digest():
    """300 random tensors (0 to 70 000 rows, 1-D and 2-D, 1/2/8-byte dtypes) split over 1-8 ranks
    the way FSDP2 splits them: the joined digest is ``tensor_digest`` of the whole tensor."""
    rng = random.Random(17)
    for _ in range(300):
        rows = rng.choice([0, 1, 2, 3, 5, 8, 15, 16, 17, 63, 64, 65, 127, 128, 129, 1000, 1023, 1025, 4097, rng.randrange(1, 6000)])
        cols = rng.choice([None, 1, 3, 16, 64, 100])
        dtype = rng.choice([torch.float32, torch.bfloat16, torch.int8, torch.float64])
        t = (torch.randn((rows,) if cols is None else (rows, cols)) * 50).to(dtype)
        world = rng.choice([1, 2, 3, 4, 5, 8])
        assert join_digest(t.dtype, t.shape, _pieces(t, world)) == D.tensor_digest(t), (t.shape, t.dtype, world)
    scalar = torch.tensor(7.0)
    assert join_digest(scalar.dtype, (), [local_pieces({"s": scalar}, {"s": (scalar.dtype, ())}, 0)["s"]]) == D.tensor_digest(scalar)


def test_a_forged_or_missing_piece_changes_or_breaks_the_join():
    t = torch.randn(3000, 8)
    parts = _pieces(t, 2)
    good = join_digest(t.dtype, t.shape, parts)
    c, s, v = parts[1].nodes[0]
    forged = Pieces(parts[1].offset, parts[1].length, parts[1].head, ((c, s, bytes(32)), *parts[1].nodes[1:]), parts[1].tail)
    assert join_digest(t.dtype, t.shape, [parts[0], forged]) != good
    edited = Pieces(parts[0].offset, parts[0].length, parts[0].head, parts[0].nodes, bytes([parts[0].tail[0] ^ 1]) + parts[0].tail[1:])
    assert join_digest(t.dtype, t.shape, [edited, parts[1]]) != good
    with pytest.raises(ValueError, match="tile"):
        join_digest(t.dtype, t.shape, [parts[0]])  # rank 1's range is missing
    with pytest.raises(ValueError, match="tile"):
        join_digest(t.dtype, t.shape, [parts[0], parts[0], parts[1]])  # overlapping
    wrong = Pieces(parts[1].offset, parts[1].length, parts[1].head, parts[1].nodes[1:], parts[1].tail)
    with pytest.raises(ValueError, match="layout"):
        join_digest(t.dtype, t.shape, [parts[0], wrong])


def test_rank_files_join_only_as_fsdp2_splits_them():
    w, step = torch.randn(5, 3), torch.tensor(4.0)
    merged = merge_shards([{"w": w[:3], "step": step}, {"w": w[3:], "step": step.clone()}], path="x")
    assert torch.equal(merged["w"], w) and torch.equal(merged["step"], step)
    with pytest.raises(ManifestMismatchError, match="dim-0 split"):  # 2 + 3 rows is not torch.chunk's 3 + 2
        merge_shards([{"w": w[:2], "step": step}, {"w": w[2:], "step": step}], path="x")
    with pytest.raises(ManifestMismatchError, match="replicated"):
        merge_shards([{"w": w[:3], "step": step}, {"w": w[3:], "step": step + 1}], path="x")
    with pytest.raises(ManifestMismatchError, match="different tensors"):
        merge_shards([{"w": w[:3], "step": step}, {"w": w[3:]}], path="x")
    with pytest.raises(ManifestMismatchError, match="dtype or shape"):
        merge_shards([{"w": w[:3]}, {"w": w[3:].double()}], path="x")


def test_sharded_layout_names_one_file_per_rank():
    assert checkpoint_files(1234, 2) == ["checkpoints/00001/step-00001234.rank-00000-of-00002.safetensors",
                                         "checkpoints/00001/step-00001234.rank-00001-of-00002.safetensors"]  # fmt: skip
    assert anchor_files(30, "optimizer", 2)[1] == "anchors/00000/step-00000030/optimizer.rank-00001-of-00002.safetensors"
    assert anchor_files(30, "rng", 2) == ["anchors/00000/step-00000030/rng.safetensors"]  # the main process's
    assert checkpoint_files(5) == [checkpoint_path(5)]
    for rel in (*checkpoint_files(1999, 4), *anchor_files(2000, "params", 4)):
        assert step_of_path(rel) in (1999, 2000)
    assert file_count(12, 4, 1, shards=2) == 4 + 12 * 2 + 4 * (2 + 2 + 1 + 1)


def test_fsdp_contracts_shard_over_the_ranks_and_replay_unsharded_in_tolerance_mode(write_contract):
    fsdp = {"fsdp": True, "fsdp_config": {"fsdp_version": 2}}
    exact = load_contract(write_contract("tiny-full", training={"world_size": 2}, trainer_args=fsdp))
    assert exact.audit.mode == "exact" and exact.shards == 2  # replayed by 2 processes with the same sharding
    c = load_contract(write_contract("tiny-full", training={"world_size": 2}, trainer_args=fsdp,
                                     audit={"mode": "tolerance", "checkpoint_every": 1, "tolerance": 1e-4}))  # fmt: skip
    assert c.shards == 2 and c.single_process().shards == 1 and "fsdp" not in c.single_process().trainer_args


def test_building_the_arguments_leaves_the_contract_as_agreed(write_contract, tmp_path):
    """TrainingArguments normalises ``fsdp_config`` in place; the contract's copy must not change (it
    did: the trace then bound another contract digest), and the live, normalised config must still
    compare equal to the contract's, and unequal to another."""
    import transformers

    from aftune_hf.recipes.common import argument_differences, training_arguments

    fsdp = {"fsdp": True, "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
    audit = {"mode": "tolerance", "checkpoint_every": 1, "tolerance": 1e-4}
    c = load_contract(write_contract("tiny-full", training={"world_size": 2}, trainer_args=fsdp, audit=audit))
    digest = c.digest_hex()
    args = training_arguments(c, str(tmp_path / "out"))
    assert c.digest_hex() == digest and dict(c.trainer_args["fsdp_config"]) == fsdp["fsdp_config"]
    assert args.fsdp_config != fsdp["fsdp_config"]  # normalised ("version", defaults added)
    assert argument_differences(c, args) == []
    other = {**fsdp, "fsdp_config": {**fsdp["fsdp_config"], "reshard_after_forward": False}}
    c2 = load_contract(write_contract("tiny-full", name="c2.yaml", training={"world_size": 2}, trainer_args=other, audit=audit))
    assert any("fsdp_config" in d for d in argument_differences(c2, args))
    assert isinstance(args, transformers.TrainingArguments)


# --- two real processes ------------------------------------------------------------------------------


@pytest.fixture
def fsdp_contract(write_contract):
    return write_contract(
        "tiny-full",
        training={"max_steps": 6, "world_size": 2},
        recipe_args={"dropout": 0.0},  # one process cannot redraw two ranks' dropout masks
        trainer_args={"fsdp": True, "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}},
        audit={"anchor_every": 3, "checkpoint_every": 1, "mode": "tolerance", "tolerance": 1e-4, "windows": 2},
    )


def _record(contract, trace, *extra):
    from tests.test_ddp import _launch
    from tests.conftest import REPO

    trace.parent.mkdir(parents=True)
    p = _launch(REPO / "tests" / "fsdp_record.py", contract, trace, *extra, cwd=trace.parent)
    assert p.returncode == 0 and "rank 0 done" in p.stdout and "rank 1 done" in p.stdout, p.stdout + p.stderr[-3000:]
    return trace


@pytest.mark.slow
def test_fsdp_recording_verifies_and_a_cheat_on_one_rank_shard_fails(fsdp_contract, tmp_path):
    from aftune_hf.verify import verify_trace

    honest = _record(fsdp_contract, tmp_path / "honest" / "trace")
    reader = TraceReader(honest)
    integrity = reader.check_integrity()
    assert integrity.num_steps == 6 and reader.shards() == 2
    assert all(len(list(honest.glob(f"checkpoints/00000/step-0000000{s}.rank-*"))) == 2 for s in range(1, 7))
    rank1 = TraceReader(honest)._tensors(checkpoint_files(2, 2)[1], None)
    full = reader.checkpoint(2, reader.schema())
    name = "model.embed_tokens.weight"
    assert rank1[name].shape[0] * 2 == full[name].shape[0]  # each rank wrote half the rows, never the whole tensor
    assert D.state_digest(full).hex() == integrity.steps()[2]["state"]  # the joined pieces are the standard digest
    report = verify_trace(honest, fsdp_contract, nonce="f1f1f1f1f1f1f1f1")
    assert report.verdict == "PASS", report.summary()
    distances = [s.distance for w in report.windows for s in w.steps]
    assert len(distances) == 6 and max(distances) <= 1e-4

    nudged = _record(fsdp_contract, tmp_path / "nudged" / "trace", "--nudge-rank", "1")
    report = verify_trace(nudged, fsdp_contract, nonce="f1f1f1f1f1f1f1f1")
    assert report.verdict == "FAIL", report.summary()
    assert any(f.check == "replay" and f.step == 2 for f in report.failures), report.summary()

    # a forger who edits rank 1's checkpoint file and recomputes the root with our own code
    from safetensors.torch import load_file, save_file

    rel = checkpoint_files(4, 2)[1]
    tensors = load_file(honest / rel)
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, honest / rel, metadata={"format": "pt"})
    root = json.loads((honest / ROOT).read_text())
    root["files"][rel] = D.file_digest(honest / rel).hex()
    root["trace_root"] = D.trace_root({k: v for k, v in root.items() if k != "trace_root"}).hex()
    (honest / ROOT).write_bytes(D.canonical_json(root))
    report = verify_trace(honest, fsdp_contract, nonce="f1f1f1f1f1f1f1f1")
    assert report.verdict == "FAIL" and any(f.code == "state_mismatch" and f.step == 4 for f in report.failures), report.summary()


def test_a_run_the_contract_says_is_fsdp_but_is_not_sharded_is_refused(fsdp_contract, tmp_path):
    """accelerate quietly trains DDP where it cannot do FSDP (CPU processes without tests/fsdp_cpu.py):
    whole tensors where the contract promises shards are refused before anything is written."""
    import transformers

    from aftune_hf import AuditCallback
    from aftune_hf.errors import RecorderError
    from aftune_hf.recipes.causal_lm import build

    contract = load_contract(fsdp_contract)
    parts = build(contract.single_process(), str(tmp_path / "out"), disable_tqdm=True)
    trace = tmp_path / "trace"
    trainer = transformers.Trainer(**parts.trainer_kwargs(), callbacks=[AuditCallback(contract, trace)])
    with pytest.raises(RecorderError, match="not a DTensor shard") as e:
        trainer.train()
    assert e.value.code == "unsupported_sharding"
    assert not trace.exists() or not any(trace.iterdir())


@pytest.mark.slow
def test_an_fsdp_trace_a_crash_left_open_is_not_resumed(fsdp_contract, tmp_path):
    """Resuming an FSDP trace is not built: after a crash at step 4 a new run into the same trace
    is refused on every rank (nothing appended), not recorded over the committed steps."""
    from tests.conftest import REPO
    from tests.test_ddp import _launch

    trace = tmp_path / "run" / "trace"
    trace.parent.mkdir()
    p = _launch(REPO / "tests" / "fsdp_record.py", fsdp_contract, trace, "--stop-at", "4", cwd=trace.parent)
    assert p.returncode != 0 and not (trace / ROOT).exists(), p.stdout + p.stderr[-2000:]
    chain = (trace / "chain.jsonl").read_bytes()
    steps = [json.loads(x)["record"]["step"] for x in chain.splitlines()]
    assert steps == list(range(len(steps))) and 1 <= len(steps) <= 4  # step 4's record is never committed
    p = _launch(REPO / "tests" / "fsdp_record.py", fsdp_contract, trace, cwd=trace.parent)
    assert p.returncode != 0 and "unsupported_sharding" in p.stdout and "resuming an FSDP trace" in p.stdout, p.stdout + p.stderr[-2000:]
    assert (trace / "chain.jsonl").read_bytes() == chain


def test_the_join_holds_only_the_pieces_never_the_tensor():
    """The main process joins a 64 GiB tensor's pieces (4 ranks; subtree values stand in for the
    ranks' hashing) without allocating anything of the tensor's size (it once did: a bytearray and a
    bool array as long as the message)."""
    from aftune_hf.sharded_digest import _header, _layout, _subtrees

    shape, world = (1 << 36,), 4
    total = len(_header(torch.int8, shape)) + shape[0]
    n = -(-total // 1024)
    parts = []
    for r in range(world):
        a, b = shard_rows(shape[0], world, r)
        offset, length = total - shape[0] + a, b - a
        c0, c1, b0, b1 = _layout(offset, length, total)
        nodes = tuple((c, s, bytes([r + 1]) * 32) for c, s in _subtrees(c0, c1, n))
        parts.append(Pieces(offset, length, bytes(b0 - offset), nodes, bytes(offset + length - b1)))
    assert len(join_digest(torch.int8, shape, parts)) == 32
    assert sum(len(p.nodes) for p in parts) < 4 * 2 * 36 and all(len(p.head) + len(p.tail) < 2048 for p in parts)


def test_a_header_that_claims_thousands_of_ranks_fails_before_listing_their_files(base_model_dir, tmp_path):
    """The rank count comes from the (untrusted) header's contract: ranks x steps beyond the reader's
    file bound is ``too_many_files`` before the expected file set is built (not a memory blow-up)."""
    from aftune_hf.errors import ResourceLimitError
    from aftune_hf.trace import HEADER, Limits
    from tests.conftest import record_tiny

    _, trace = record_tiny(tmp_path, base_model_dir, steps=3, anchor_every=3)
    header = json.loads((trace / HEADER).read_text())
    header["contract"]["trainer_args"] = {"fsdp": True}
    header["contract"]["training"]["world_size"] = 4096
    (trace / HEADER).write_bytes(D.canonical_json(header))
    with pytest.raises(ResourceLimitError, match="4096 ranks x 4 steps"):
        TraceReader(trace, limits=Limits(max_files=10_000)).check_integrity()


# --- exact replay with the recorded sharding ---------------------------------------------------------


@pytest.fixture
def fsdp_exact_contract(write_contract):
    return write_contract(
        "tiny-full", name="exact.yaml",
        training={"max_steps": 6, "world_size": 2},
        trainer_args={"fsdp": True, "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}},
        audit={"anchor_every": 3, "checkpoint_every": 2, "mode": "exact", "windows": 2},
    )  # fmt: skip


def _verify_exact(trace, contract, name):
    from tests.conftest import REPO
    from tests.test_ddp import _launch

    report = trace.parent / f"{name}.json"
    p = _launch(REPO / "tests" / "fsdp_verify.py", trace, "--contract", contract, "--nonce", "e5e5e5e5e5e5e5e5",
                "--num-processes", "2", "--report", report, cwd=trace.parent)  # fmt: skip
    assert report.exists(), p.stdout + p.stderr[-3000:]
    return p, json.loads(report.read_text())


@pytest.mark.slow
def test_an_fsdp_trace_replays_exactly_with_its_sharding_and_a_cheat_on_one_rank_fails(fsdp_exact_contract, tmp_path):
    """Two processes replay every window as FSDP2 ranks (each loads its rows of the anchor, digests
    joined from shard pieces): bit-equal state, loss, grad norm and end state -> PASS; rank 1 editing
    its shard after step 2 -> FAIL at step 2."""
    honest = _record(fsdp_exact_contract, tmp_path / "honest" / "trace")
    p, report = _verify_exact(honest, fsdp_exact_contract, "honest")
    assert p.returncode == 0 and report["verdict"] == "PASS", p.stdout + p.stderr[-3000:]
    steps = [s for w in report["windows"] for s in w["steps"]]
    assert len(steps) == 6 and all(s["state_equal"] for s in steps)

    # a forger scales rank 1's shard of one first moment in the step-3 anchor and recomputes every
    # digest with our own code: the structure holds, both windows touching the anchor replay it apart
    import shutil

    from safetensors.torch import load_file, save_file

    from aftune_hf.fuzz import reseal

    forged = tmp_path / "forged" / "trace"
    shutil.copytree(honest, forged)
    rel = anchor_files(3, "optimizer", 2)[1]
    tensors = load_file(forged / rel)
    key = next(k for k in sorted(tensors) if k.endswith("/exp_avg") and tensors[k].dim() == 2)
    tensors[key] = tensors[key] * 1.5
    save_file(tensors, forged / rel, metadata={"format": "pt"})
    reseal(forged)
    p, report = _verify_exact(forged, fsdp_exact_contract, "forged")
    assert report["verdict"] == "FAIL" and {f["check"] for f in report["failures"]} == {"replay"}, p.stdout + p.stderr[-2000:]
    assert ("anchor_state", 3) in [(f["code"], f["step"]) for f in report["failures"]], report["failures"]
    assert any(f["code"] == "replay_mismatch" and f["step"] == 4 for f in report["failures"]), report["failures"]

    nudged = _record(fsdp_exact_contract, tmp_path / "nudged" / "trace", "--nudge-rank", "1")
    p, report = _verify_exact(nudged, fsdp_exact_contract, "nudged")
    assert p.returncode == 1 and report["verdict"] == "FAIL", p.stdout + p.stderr[-3000:]
    assert any(f["check"] == "replay" and f["step"] == 2 and "state digest" in f["reason"] for f in report["failures"]), report
