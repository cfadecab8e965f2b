"""Re-execute one challenged window and compare it with the trace: per step, and the full state at its ends.

Example:
    >>> result = check_window(contract, reader, integrity, 1, 4, 8, workdir, expected=expected)  # doctest: +SKIP
    >>> result.ok, [s.step for s in result.steps]                                             # doctest: +SKIP
    (True, [5, 6, 7, 8])
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .. import digest as D
from ..contract import Contract
from ..errors import AftuneError, ProviderFault, TraceFormatError, VerifierEnvironmentError
from ..replay import by_rank, replay_window
from ..report import Failure, StepCheck, WindowResult
from ..trace import Integrity, TraceReader
from .derive import FLOAT_RTOL, Expected, derive_expected, end_state_differences, same_value
from .structure import Challenge

Log = Callable[[str], None]
LOSS_RTOL = 1e-3  # tolerance mode: loss and grad norm may differ by this relative amount


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """``(max over tensors of the relative L2 distance, max abs difference)`` of ``a`` against ``b``.

    Per tensor, so a change concentrated in one tensor is not diluted by the others; NaN or inf on
    either side gives ``inf``."""
    worst = max_abs = 0.0
    for n, t in b.items():
        x, y = a[n].double(), t.double()
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            return math.inf, math.inf
        if not t.numel():
            continue
        diff = x - y
        worst = max(worst, float(diff.norm()) / max(float(y.norm()), 1e-30) if float(diff.norm()) else 0.0)
        max_abs = max(max_abs, float(diff.abs().max()))
    return worst, max_abs


def _close(a: float | None, b: float | None) -> bool:
    """Loss / grad norm within :data:`LOSS_RTOL`; NaN or inf never."""
    if a is None or b is None:
        return a is None and b is None
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= LOSS_RTOL * max(abs(a), abs(b))


def check_window(
    contract: Contract, reader: TraceReader, integrity: Integrity, index: int, start: int, end: int, workdir: Path,
    *, distributed: bool = False, expected: Expected | None = None,
) -> WindowResult:
    """Re-execute one window and compare every step with its record, and the window's full end state
    with the anchor that closes it (window 0 also its full start state with the step-0 anchor);
    ``distributed``: this process is one of the contract's ``world_size`` processes replaying it
    together, see :func:`replay_window`."""
    t0 = time.perf_counter()
    steps = integrity.steps()
    schema = reader.schema()
    tolerance = contract.audit.mode == "tolerance"
    world = contract.training.world_size
    anchor = reader.anchor(start, schema) if start else None
    if anchor is not None and anchor.world_size != world:
        raise TraceFormatError("state_invalid", f"the anchor holds {anchor.world_size} processes' RNG state, "
                               f"the contract has world_size {world}", step=start)  # fmt: skip
    expected = expected or derive_expected(contract, workdir / "expected")
    try:
        cells = None
        if contract.audit.layer_blocks is not None:  # the cell tables and optimizer digests are re-derived too
            from ..cells.track import CellTracker

            cells = CellTracker(contract.audit.layer_blocks)
        replay = replay_window(contract, start, end, anchor, workdir, expected, keep_params=tolerance,
                               distributed=distributed, cells=cells)  # fmt: skip
    except (AftuneError, OSError, MemoryError, ImportError):
        raise
    except Exception as e:  # noqa: BLE001
        if _out_of_memory(e):
            raise VerifierEnvironmentError("out_of_memory", f"the verifier ran out of memory replaying window {index}: "
                                           f"{str(e)[:200]}", step=start) from e  # fmt: skip
        # the anchor's content made the Trainer fail: provider fault
        raise ProviderFault("replay_failed", f"{type(e).__name__}: {str(e)[:200]}", step=start) from e
    if replay.initial_state.hex() != steps[start]["state"] and not (tolerance and start == 0):  # step 0: see check_structure
        return WindowResult(index, start, end, False, time.perf_counter() - t0, (), "replay did not start from the anchor")
    checks = []
    for r in replay.steps:
        f, s = r.fields, r.fields["step"]
        rec = steps[s]
        problems = []
        ranks = f["batches"] if len(f["batches"]) == world else by_rank(f["batches"][0], world)
        if D.step_data_digest(ranks).hex() != rec["data"]:
            problems.append("micro-batches differ")
        if f["num_items"] != rec["num_items"]:
            problems.append("num_items differs")
        if D.encode_float(f["lr"]) != rec["lr"] and not (tolerance and same_value(f["lr"], D.decode_float(rec["lr"]), FLOAT_RTOL)):
            problems.append(f"lr {f['lr']:.6g} != recorded {D.decode_float(rec['lr']):.6g}")
        loss_rec = D.decode_float(rec["loss"])
        grad_rec = None if rec["grad_norm"] is None else D.decode_float(rec["grad_norm"])
        state_equal = f["state"].hex() == rec["state"]
        dist = max_abs = None
        if tolerance:
            recorded = reader.checkpoint(s, schema)
            dist, max_abs = distance(r.params, recorded)
            if not dist <= contract.audit.tolerance:
                problems.append(f"distance {dist:.3e} > tolerance {contract.audit.tolerance:.3e}")
            if not _close(f["loss"], loss_rec):
                problems.append(f"loss {f['loss']:.6g} != recorded {loss_rec:.6g}")
            if not _close(f["grad_norm"], grad_rec):
                problems.append(f"grad norm {f['grad_norm']} != recorded {grad_rec}")
        else:
            if not state_equal:
                problems.append("state digest differs")
            if D.encode_float(f["loss"]) != rec["loss"]:
                problems.append(f"loss {f['loss']!r} != recorded {loss_rec!r}")
            if (None if f["grad_norm"] is None else D.encode_float(f["grad_norm"])) != rec["grad_norm"]:
                problems.append("grad norm differs")
            for key in ("cells", "optim"):
                if (f[key].hex() if key in f else None) != rec.get(key):
                    problems.append(f"{key} digest differs")
        checks.append(StepCheck(s, not problems, state_equal, dist, max_abs, f["loss"] - loss_rec, "; ".join(problems)))
    seconds = time.perf_counter() - t0
    if [c.step for c in checks] != list(range(start + 1, end + 1)) or replay.end is None:
        return WindowResult(index, start, end, False, seconds, tuple(checks), "replay stopped early")
    tol = contract.audit.tolerance if tolerance else None
    start_state = ""
    if start == 0 and replay.start is not None:
        start_state = "; ".join(end_state_differences(replay.start, reader.anchor(0, schema), tolerance=tol)[:4])
    end_state = "; ".join(end_state_differences(replay.end, reader.anchor(end, schema), tolerance=tol)[:4])
    ok = all(c.ok for c in checks) and not start_state and not end_state
    return WindowResult(index, start, end, ok, seconds, tuple(checks), "", start_state, end_state)


def _out_of_memory(e: BaseException) -> bool:
    """A verifier-side allocation failure (torch raises these as RuntimeError subclasses)."""
    oom = getattr(torch, "OutOfMemoryError", ())
    text = str(e).lower()
    return isinstance(e, oom) or (isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


# --- several windows ----------------------------------------------------------------------------------


def check_windows(
    c: Contract, reader: TraceReader, integrity: Integrity, challenge: Challenge, todo: Sequence[int], work: Path,
    *, say: Log = lambda _m: None, progress: bool = False, distributed: bool = False, expected: Expected | None = None,
) -> list[WindowResult]:
    """Re-execute the windows ``todo`` (indices into ``challenge.bounds``); a provider fault in one
    window makes that window fail, the others still run."""
    from tqdm.auto import tqdm

    if todo and expected is None:
        expected = derive_expected(c, work / "expected")

    results = []
    for n, i in enumerate(tqdm(todo, desc="replaying windows", unit="window", disable=not progress), 1):
        start, end = challenge.bounds[i]
        say(f"replaying window {i} (steps {start + 1}-{end}) [{n}/{len(todo)}]")
        try:
            res = check_window(c, reader, integrity, i, start, end, work / f"w{i}", distributed=distributed,
                               expected=expected)
        except ProviderFault as e:
            res = WindowResult(i, start, end, False, 0.0, (), f"{e.code}: {e.detail}")
        results.append(res)
    return results


def window_failures(res: WindowResult) -> list[Failure]:
    """The report's failures for one window result."""
    if res.ok:
        return []
    out = [Failure("replay", "replay_mismatch", c.detail, c.step) for c in res.steps if not c.ok]
    if res.start_state:
        out.append(Failure("replay", "initial_state", f"the step-0 anchor is not the contract's initial state: {res.start_state}", 0))
    if res.end_state:
        out.append(Failure("replay", "anchor_state", f"the anchor is not the replayed end state: {res.end_state}", res.end))
    return out or [Failure("replay", "replay_failed", res.failure, res.start + 1)]
