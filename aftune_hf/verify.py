"""All pass/fail policy: structure, data, challenge, replay -> :class:`VerificationReport`.

Everything the provider controls that prevents verification is FAIL; only verifier-side
trouble (local disk, memory, missing dependency) is ERROR; PASS only through every check.
Policy comes from the client's contract, never from the trace.

Example:
    >>> from aftune_hf.verify import verify_trace
    >>> report = verify_trace("runs/trace", "configs/tiny-lora.yaml", nonce="a1b2c3")   # doctest: +SKIP
    >>> print(report.summary())                                                        # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import digest as D
from .contract import Contract, load_contract
from .errors import (
    AftuneError, ClientArtifactError, ConfigError, ManifestMismatchError, ProviderFault, TraceFormatError,
    VerifierEnvironmentError,
)  # fmt: skip
from .derive import FLOAT_RTOL, Expected, derivable_differences, derive_expected, end_state_differences
from .delivered import check_delivered
from .replay import build_recipe, by_rank, iter_data_steps, replay_window
from .report import ERROR, FAIL, INCONCLUSIVE, PASS, DataCheck, Detection, Failure, StepCheck, VerificationReport, WindowResult
from .trace import Integrity, TraceReader

Log = Callable[[str], None]
LOSS_RTOL = 1e-3  # tolerance mode: loss and grad norm may differ by this relative amount


@dataclass(frozen=True)
class Challenge:
    """The windows a (trace root, nonce) pair selects."""

    nonce: bytes
    seed: bytes
    bounds: tuple[tuple[int, int], ...]  # every window (start, end]
    chosen: tuple[int, ...]


def window_bounds(contract: Contract) -> tuple[tuple[int, int], ...]:
    """Windows ``(a_i, a_{i+1}]`` between consecutive anchors (every ``anchor_every``, and the end)."""
    n, k = contract.training.max_steps, contract.audit.anchor_every
    edges = sorted({*range(0, n, k), n})
    return tuple(zip(edges, edges[1:]))


def make_challenge(contract: Contract, trace_root: bytes, nonce: bytes, k: int | None = None) -> Challenge:
    bounds = window_bounds(contract)
    seed = D.challenge_seed(trace_root, nonce)
    chosen = D.sample_windows(seed, len(bounds), k or contract.audit.windows)
    return Challenge(nonce, seed, bounds, tuple(chosen))


# --- structure -------------------------------------------------------------------------------


def check_structure(reader: TraceReader, contract: Contract, workdir: Path, expected: Expected | None = None) -> Integrity:
    """The cheap whole-trace check; raises a :class:`ProviderFault` on the first problem.

    Besides the commitments: every step's lr is the contract's schedule at that step, and every
    anchor's optimizer options, scheduler state and step counter are the contract's
    (``expected``, derived from the client's recipe when not given)."""
    from .errors import CommitmentError, ContractViolationError

    integrity = reader.check_integrity()
    header = reader.header()
    if header["contract_digest"] != contract.digest_hex():
        raise ContractViolationError("contract_mismatch", f"trace binds contract {header['contract_digest']}, "
                                     f"the client's is {contract.digest_hex()}")  # fmt: skip
    if header["contract"] != contract.canonical():
        raise ContractViolationError("contract_mismatch", "the header's copy of the contract is not the client's")
    want = contract.training.max_steps
    if integrity.num_steps != want:
        raise CommitmentError("step_count", f"trace has {integrity.num_steps} steps, contract says {want}")
    from .card import render_card
    from .trace import CARD

    if reader.read_bytes(CARD) != render_card(header, integrity.root).encode("utf-8"):
        raise ManifestMismatchError("card_mismatch", "README.md is not the card this trace implies", path=CARD)
    expected = expected or derive_expected(contract, workdir / "init")
    init_digest, schema = expected.initial_state, dict(expected.schema)
    if reader.schema() != schema:
        raise ManifestMismatchError("schema_mismatch", "trainable tensors differ from the contract's recipe")
    steps = integrity.steps()
    if steps[0]["state"] != init_digest.hex():
        raise ContractViolationError("initial_state", "step 0 is not the contract's base/initial state", step=0)
    audit = contract.audit
    rtol = 0.0 if audit.mode == "exact" else FLOAT_RTOL
    for s, rec in steps.items():
        if s and not _same_float(D.decode_float(rec["lr"]), expected.lrs[s - 1], rtol):
            raise ContractViolationError("lr_schedule", f"recorded lr {D.decode_float(rec['lr']):.9g} is not the "
                                         f"contract's {expected.lrs[s - 1]:.9g}", step=s)  # fmt: skip
        need_anchor = s == 0 or s % audit.anchor_every == 0 or s == want
        if need_anchor and rec["anchor"] is None:
            raise ManifestMismatchError("challenged_window_unavailable", "anchor missing", step=s)
        if s and (s % audit.checkpoint_every == 0 or s == want) and not rec["checkpoint"]:
            raise ManifestMismatchError("checkpoint_missing", "checkpoint required by the contract", step=s)
        if s and rec["checkpoint"] and D.state_digest(reader.checkpoint(s, schema)).hex() != rec["state"]:
            raise CommitmentError("state_mismatch", "checkpoint is not the committed state", step=s)
        if rec["anchor"] is not None:
            anchor = reader.anchor(s, schema)
            if anchor.digest().hex() != rec["anchor"] or D.state_digest(anchor.params).hex() != rec["state"]:
                raise CommitmentError("anchor_mismatch", "anchor is not the committed state", step=s)
            if s not in expected.groups or (diffs := derivable_differences(anchor, expected, rtol=rtol)):
                raise ContractViolationError("anchor_hyperparameters", "the anchor's derivable state is not the "
                                             f"contract's: {'; '.join(diffs[:4]) or 'not an anchor step'}", step=s)  # fmt: skip
    return integrity


def _same_float(a: float, b: float, rtol: float) -> bool:
    if rtol == 0.0 or not (math.isfinite(a) and math.isfinite(b)):
        return D.encode_float(a) == D.encode_float(b)
    return abs(a - b) <= rtol * max(abs(a), abs(b))


# --- replay policy ---------------------------------------------------------------------------------


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
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
        replay = replay_window(contract, start, end, anchor, workdir, expected, keep_params=tolerance,
                               distributed=distributed)  # fmt: skip
    except (AftuneError, OSError, MemoryError, ImportError):
        raise
    except Exception as e:  # noqa: BLE001
        if _out_of_memory(e):
            raise VerifierEnvironmentError("out_of_memory", f"the verifier ran out of memory replaying window {index}: "
                                           f"{str(e)[:200]}", step=start) from e  # fmt: skip
        # the anchor's content made the Trainer fail: provider fault
        raise ProviderFault("replay_failed", f"{type(e).__name__}: {str(e)[:200]}", step=start) from e
    if replay.initial_state.hex() != steps[start]["state"]:
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
        if D.encode_float(f["lr"]) != rec["lr"] and not (tolerance and _same_float(f["lr"], D.decode_float(rec["lr"]), FLOAT_RTOL)):
            problems.append(f"lr {f['lr']:.6g} != recorded {D.decode_float(rec['lr']):.6g}")
        loss_rec = D.decode_float(rec["loss"])
        grad_rec = None if rec["grad_norm"] is None else D.decode_float(rec["grad_norm"])
        state_equal = f["state"].hex() == rec["state"]
        distance = max_abs = None
        if tolerance:
            recorded = reader.checkpoint(s, schema)
            distance, max_abs = _distance(r.params, recorded)
            if not distance <= contract.audit.tolerance:
                problems.append(f"distance {distance:.3e} > tolerance {contract.audit.tolerance:.3e}")
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
        checks.append(StepCheck(s, not problems, state_equal, distance, max_abs, f["loss"] - loss_rec, "; ".join(problems)))
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


# --- the pipeline --------------------------------------------------------------------------------------


def verify_trace(
    trace: str | Path,
    contract: Contract | str | Path,
    *,
    nonce: str | bytes | None = None,
    windows: int | None = None,
    model: str | Path | None = None,
    only_windows: Sequence[int] | None = None,
    data_check: bool = True,
    log: Log | None = None,
    endpoint: str | None = None,
    progress: bool = False,
) -> VerificationReport:
    """Verify a local trace against the client's contract. Never raises for provider faults.

    Args:
        trace: the trace directory, or ``hf://[datasets/]OWNER/NAME@COMMIT_SHA`` (downloaded at that
            commit into a private directory first; ``endpoint`` overrides the Hub URL).
        contract: the client's own contract (object or YAML path).
        nonce: the client's challenge nonce (hex string or bytes); drawn at random when absent.
        windows: how many windows to re-execute (default: the contract's ``audit.windows``).
        model: the weights or adapter delivered to the client; must equal the final state.
        only_windows: re-execute only these window indices (to split work across processes).
        data_check: run the all-steps data check.
        log: progress messages (e.g. ``print``).
        progress: show a tqdm progress bar over the replayed windows.
    """
    say = log or (lambda _m: None)
    t0 = time.perf_counter()
    c = contract if isinstance(contract, Contract) else load_contract(contract)
    if windows is not None and (isinstance(windows, bool) or not isinstance(windows, int) or windows < 1):
        raise ConfigError("invalid_windows", f"windows must be an integer >= 1, got {windows!r}")
    nonce_bytes = bytes.fromhex(nonce) if isinstance(nonce, str) else (nonce or os.urandom(16))
    base = dict(contract_digest=c.digest_hex(), mode=c.audit.mode, nonce=nonce_bytes.hex(), source=str(trace),
                tolerance=c.audit.tolerance, contract=c.canonical())  # fmt: skip
    failures: list[Failure] = []
    try:
        with tempfile.TemporaryDirectory(prefix="aftune-verify-") as tmp:
            work = Path(tmp)
            say("checking your base model and dataset against the contract")
            check_client_artifacts(c)  # the client's own files: a mismatch is ERROR, never the provider's FAIL
            parts = build_recipe(c, work / "init")
            expected = derive_expected(c, work / "init", parts)
            try:
                from .hub import local_copy

                if isinstance(trace, str) and trace.startswith("hf://"):
                    say(f"downloading {trace}")
                local = local_copy(trace, work, endpoint=endpoint, progress=progress)
                say("structural check")
                reader = TraceReader(local)
                integrity = check_structure(reader, c, work, expected)
                if model is not None:
                    check_delivered(model, reader.schema(), integrity.root["final_state"], parts.model,
                                    c.resolve(c.base_model.path))  # fmt: skip
            except ProviderFault as e:
                failures.append(failure_from("structure", e))
                return VerificationReport(FAIL, **base, failures=tuple(failures), seconds=time.perf_counter() - t0)
            root_hex = integrity.trace_root.hex()
            challenge = make_challenge(c, integrity.trace_root, nonce_bytes, windows)
            detection = Detection.compute(len(challenge.bounds), len(challenge.chosen), c.audit.detect_fraction,
                                          c.audit.min_detection)  # fmt: skip
            data = None
            if data_check:
                say(f"data check of all {integrity.num_steps} steps")
                data = _data_check(c, integrity, work, failures)
            todo = [i for i in challenge.chosen if only_windows is None or i in only_windows]
            if todo and c.training.world_size > 1 and c.audit.mode == "exact":
                raise VerifierEnvironmentError(
                    "unsupported", f"exact replay of a {c.training.world_size}-process trace needs that many "
                    f"processes: accelerate launch --num_processes {c.training.world_size} scripts/verify.py ...")  # fmt: skip
            results = check_windows(c, reader, integrity, challenge, todo, work, say=say, progress=progress,
                                    expected=expected)  # fmt: skip
            failures.extend(f for res in results for f in window_failures(res))
            verdict = FAIL if failures else INCONCLUSIVE if detection.achieved < detection.required else PASS
            return VerificationReport(
                verdict, **base, trace_root=root_hex, seed=challenge.seed.hex(), num_steps=integrity.num_steps,
                windows=tuple(results), data_check=data, detection=detection, failures=tuple(failures),
                seconds=time.perf_counter() - t0, curve=_curve(integrity),
            )  # fmt: skip
    except (OSError, MemoryError, ImportError, AftuneError) as e:
        if isinstance(e, ProviderFault):
            failures.append(failure_from("structure", e))
            return VerificationReport(FAIL, **base, failures=tuple(failures), seconds=time.perf_counter() - t0)
        return VerificationReport(ERROR, **base, error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t0)


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


def check_client_artifacts(c: Contract) -> None:
    """The client's own base model and dataset must hash to its contract's digests (else ERROR)."""
    from .artifacts import check_artifacts

    try:
        check_artifacts(c)
    except ProviderFault as e:  # raised as a contract violation for the provider; here it is the client's file
        raise ClientArtifactError(e.code, f"your local file does not match your contract: {e.detail}", path=e.path) from None


def failure_from(check: str, e: AftuneError) -> Failure:
    return Failure(check, e.code, f"{e.detail}{f' ({e.path})' if e.path else ''}", e.step)


def _data_check(c: Contract, integrity: Integrity, work: Path, failures: list[Failure]) -> DataCheck:
    t0 = time.perf_counter()
    steps = integrity.steps()
    bad: list[int] = []
    checked = 0
    for s, batches, num_items in iter_data_steps(c, work):
        rec = steps.get(s)
        checked += 1
        if rec is None or D.step_data_digest(batches).hex() != rec["data"] or rec["num_items"] != num_items:
            bad.append(s)
            failures.append(Failure("data", "data_mismatch", "micro-batches differ from the contract's data pipeline", s))
    if checked != integrity.num_steps:
        failures.append(Failure("data", "data_mismatch", f"the data pipeline yields {checked} steps"))
    return DataCheck(checked, tuple(bad), time.perf_counter() - t0)


def _curve(integrity: Integrity) -> tuple[tuple[int, float, float], ...]:
    """(step, loss, lr) of every step as the trace records it, for the report's plots."""
    return tuple((s, D.decode_float(r["loss"]), D.decode_float(r["lr"])) for s, r in sorted(integrity.steps().items()) if s)


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


__all__ = ["Challenge", "check_structure", "check_windows", "make_challenge", "verify_trace", "window_bounds", "window_failures"]
