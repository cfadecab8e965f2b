"""Crash safety: SIGKILL the recorder at 20 random points, resume each run, every trace PASSes.

Children come from a forkserver that has already imported torch and transformers, so each of the
40 runs starts in well under a second instead of ~7 s.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time

import pytest

from aftune_hf.trace import TraceReader
from aftune_hf.verify import verify_trace
from tests import record_child

pytestmark = pytest.mark.slow
STEPS = 8


def _child(contract, trace, out, resume, sleep, queue):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    record_child.run(contract, trace, out, resume, sleep, report=queue.put)
    queue.put("done")


@pytest.fixture(scope="module")
def ctx():
    c = mp.get_context("forkserver")
    c.set_forkserver_preload(["torch", "transformers", "aftune_hf.callback", "tests.record_child"])
    return c


def _run(ctx, contract, trace, out, *, resume=False, sleep=0.0, kill_at=None, rng=None):
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(str(contract), str(trace), str(out), resume, sleep, queue))
    proc.start()
    deadline = time.time() + 300
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
        if msg == "done" or (kill_at is not None and msg == kill_at):
            break
    if kill_at is not None:
        time.sleep(rng.uniform(0.0, sleep + 0.05))  # land anywhere inside the next step, mid-write included
        os.kill(proc.pid, signal.SIGKILL)
    proc.join(300)
    return proc.exitcode


def test_sigkill_at_20_random_points_then_resume(ctx, write_contract, tmp_path):
    contract = write_contract(training={"max_steps": STEPS}, audit={"anchor_every": 3, "windows": 3})
    assert _run(ctx, contract, tmp_path / "ref", tmp_path / "ref-out") == 0
    reference = TraceReader(tmp_path / "ref").check_integrity()
    ref_states = [r["state"] for r in reference.steps().values()]
    rng = random.Random(2026)
    killed_at = []
    for i in range(20):
        trace, out = tmp_path / f"t{i}", tmp_path / f"o{i}"
        kill_at = rng.randint(0, STEPS - 1)
        code = _run(ctx, contract, trace, out, sleep=0.1, kill_at=kill_at, rng=rng)
        killed_at.append((kill_at, code))
        assert _run(ctx, contract, trace, out, resume=True) == 0, f"resume after a kill at step {kill_at} failed"
        integrity = TraceReader(trace).check_integrity()
        steps = [e.record["step"] for e in integrity.entries if e.record["kind"] == "step"]
        assert steps == list(range(1, STEPS + 1)), f"kill at {kill_at}: steps {steps}"
        assert [r["state"] for r in integrity.steps().values()] == ref_states  # bit-identical to the uninterrupted run
        report = verify_trace(trace, contract, nonce=f"{i:02x}", windows=3)
        assert report.verdict == "PASS", f"kill at step {kill_at}: {report.summary()}"
    assert sum(code == -signal.SIGKILL for _, code in killed_at) >= 15  # (a kill may land after a fast finish)
