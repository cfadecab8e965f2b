"""Crash safety: SIGKILL the recorder anywhere, run the README's resume, every trace PASSes and
commits exactly what an uninterrupted run commits.

20 kills at random times (start-up included), 5 at fixed points of finalisation (fault injection
in the child: those points last microseconds). After every finalisation kill and every fourth
random one, the finished job is run again, with and without resume_from_checkpoint: it must
refuse and change no byte. Children come from a forkserver that has already imported torch and
transformers, so each run starts in well under a second.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time

import pytest

from aftune_hf.trace import CARD, CHAIN, HEADER, TraceReader
from aftune_hf.verify import verify_trace
from tests import record_child

pytestmark = pytest.mark.slow
STEPS = 8


def _child(contract, trace, out, resume, sleep, kill_in, queue):
    from aftune_hf.errors import AftuneError

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        record_child.run(contract, trace, out, resume, sleep, report=queue.put, kill_in=kill_in)
    except AftuneError as e:
        queue.put(("error", e.code))
        raise
    queue.put("done")


@pytest.fixture(scope="module")
def ctx():
    c = mp.get_context("forkserver")
    c.set_forkserver_preload(["torch", "transformers", "aftune_hf.callback", "tests.record_child"])
    return c


def _run(ctx, contract, trace, out, *, resume=False, sleep=0.0, kill_at=None, kill_in=None, rng=None):
    """Run the child; returns (exit code, last message: "done", ("error", code) or a step)."""
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(str(contract), str(trace), str(out), resume, sleep, kill_in, queue))
    proc.start()
    deadline, msg = time.time() + 300, None
    while time.time() < deadline:
        if kill_at == 0:  # during start-up (imports done, Trainer being built, step-0 anchor)
            time.sleep(rng.uniform(0.0, 1.5))
            break
        try:
            msg = queue.get(timeout=1)
        except Exception:  # noqa: BLE001 - queue.Empty: keep waiting while the child lives
            if not proc.is_alive():
                break
            continue
        if msg == "done" or isinstance(msg, tuple) or (kill_at is not None and msg == kill_at):
            break
    if kill_at is not None:
        time.sleep(rng.uniform(0.0, sleep + 0.05))  # land anywhere inside the next step, mid-write included
        os.kill(proc.pid, signal.SIGKILL)
    proc.join(300)
    return proc.exitcode, msg


def _committed(trace):
    """What a run commits, apart from its run id and resume records: the step records and the
    bytes of every checkpoint and anchor file."""
    integrity = TraceReader(trace).check_integrity()
    records = [e.record for e in integrity.entries if e.record["kind"] != "resume"]
    files = {rel: h for rel, h in integrity.root["files"].items() if rel not in (HEADER, CHAIN, CARD)}
    return records, files, integrity.root["final_state"]


def _files(trace):
    return {p.relative_to(trace).as_posix(): p.read_bytes() for p in sorted(trace.rglob("*")) if p.is_file()}


def _recover_and_check(ctx, contract, trace, out, reference, label, nonce, *, rerun=True):
    code, msg = _run(ctx, contract, trace, out, resume=True)
    assert code == 0 or msg == ("error", "trace_finished"), f"{label}: the README's resume failed ({code}, {msg})"
    assert _committed(trace) == reference, f"{label}: the recovered trace commits something else"
    before = _files(trace)
    for resume in (True, False) if rerun else ():  # running the finished job again refuses and changes no byte
        code, msg = _run(ctx, contract, trace, out, resume=resume)
        assert msg == ("error", "trace_finished") and code != 0, f"{label}: re-run gave {code}, {msg}"
        assert _files(trace) == before, f"{label}: re-running the finished job changed the trace"
    assert not (out / f"checkpoint-{STEPS + 1}").exists(), f"{label}: the Trainer ran a step past the contract"
    report = verify_trace(trace, contract, nonce=nonce, windows=3)
    assert report.verdict == "PASS", f"{label}: {report.summary()}"


def test_sigkill_anywhere_then_the_readme_resume(ctx, write_contract, tmp_path):
    contract = write_contract(training={"max_steps": STEPS}, audit={"anchor_every": 3, "windows": 3})
    assert _run(ctx, contract, tmp_path / "ref", tmp_path / "ref-out")[0] == 0
    reference = _committed(tmp_path / "ref")
    rng = random.Random(2026)
    killed = 0
    for i in range(20):
        trace, out = tmp_path / f"t{i}", tmp_path / f"o{i}"
        kill_at = 0 if i < 3 else rng.randint(1, STEPS - 1)
        code, _ = _run(ctx, contract, trace, out, sleep=0.1, kill_at=kill_at, rng=rng)
        killed += code == -signal.SIGKILL
        _recover_and_check(ctx, contract, trace, out, reference, f"kill at step {kill_at} (#{i})", f"{i:016x}",
                           rerun=i % 4 == 0)  # (re-runs: every finalisation point below, and 5 of these)
    assert killed >= 15  # (a kill may land after a fast finish)
    for j, point in enumerate(record_child.KILL_POINTS):
        trace, out = tmp_path / f"f{j}", tmp_path / f"fo{j}"
        code, _ = _run(ctx, contract, trace, out, kill_in=point)
        assert code == -signal.SIGKILL, f"{point}: the fault point was never reached"
        _recover_and_check(ctx, contract, trace, out, reference, f"kill {point}", f"f{j:015x}")
