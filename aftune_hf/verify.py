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
from .errors import AftuneError, ManifestMismatchError, ProviderFault, TraceFormatError, VerifierEnvironmentError
from .replay import by_rank, initial_state, iter_data_steps, replay_window
from .report import ERROR, FAIL, PASS, DataCheck, Detection, Failure, StepCheck, VerificationReport, WindowResult
from .safeio import parse_safetensors, read_regular_file
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


def check_structure(reader: TraceReader, contract: Contract, workdir: Path) -> Integrity:
    """The cheap whole-trace check; raises a :class:`ProviderFault` on the first problem."""
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
    init_digest, schema = initial_state(contract, workdir / "init")
    if reader.schema() != schema:
        raise ManifestMismatchError("schema_mismatch", "trainable tensors differ from the contract's recipe")
    steps = integrity.steps()
    if steps[0]["state"] != init_digest.hex():
        raise ContractViolationError("initial_state", "step 0 is not the contract's base/initial state", step=0)
    audit = contract.audit
    for s, rec in steps.items():
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
    return integrity


def delivered_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a delivered model or adapter directory (or one .safetensors file), strictly parsed."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(p.glob("*.safetensors"))
    if not files:
        raise ManifestMismatchError("model_missing", "no .safetensors in the delivered model", path=str(p))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        blob = read_regular_file(f.parent, f.name, max_bytes=1 << 40)
        out.update(parse_safetensors(blob, path=f.name))
    return out


def check_delivered(path: str | Path, schema: dict[str, Any], final_state: str) -> None:
    """The delivered weights/adapter must equal the trace's final trainable state."""
    tensors = delivered_state(path)
    by_plain = {n.replace(".default.", "."): n for n in schema}  # PEFT saves adapters without the adapter name
    mapped = {by_plain.get(n, n): t for n, t in tensors.items()}
    mapped = {n: t for n, t in mapped.items() if n in schema} if set(schema) <= set(mapped) else mapped
    if set(mapped) != set(schema) or D.state_digest(mapped).hex() != final_state:
        raise ManifestMismatchError("model_mismatch", "the delivered model is not the trace's final state", path=str(path))


# --- replay policy ---------------------------------------------------------------------------------


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    num = den = 0.0
    max_abs = 0.0
    for n, t in b.items():
        x, y = a[n].double(), t.double()
        num += float((x - y).pow(2).sum())
        den += float(y.pow(2).sum())
        max_abs = max(max_abs, float((x - y).abs().max())) if t.numel() else max_abs
    return math.sqrt(num) / max(math.sqrt(den), 1e-30), max_abs


def _close(a: float, b: float) -> bool:
    return a == b or (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= LOSS_RTOL * max(abs(a), abs(b)))


def check_window(
    contract: Contract, reader: TraceReader, integrity: Integrity, index: int, start: int, end: int, workdir: Path,
    *, distributed: bool = False,
) -> WindowResult:
    """Re-execute one window and compare every step with its record (``distributed``: this process is
    one of the contract's ``world_size`` processes replaying it together, see :func:`replay_window`)."""
    t0 = time.perf_counter()
    steps = integrity.steps()
    schema = reader.schema()
    tolerance = contract.audit.mode == "tolerance"
    world = contract.training.world_size
    anchor = reader.anchor(start, schema) if start else None
    if anchor is not None and anchor.world_size != world:
        raise TraceFormatError("state_invalid", f"the anchor holds {anchor.world_size} processes' RNG state, "
                               f"the contract has world_size {world}", step=start)  # fmt: skip
    try:
        init, replayed = replay_window(contract, start, end, anchor, workdir, keep_params=tolerance,
                                       distributed=distributed)  # fmt: skip
    except (AftuneError, OSError, MemoryError, ImportError):
        raise
    except Exception as e:  # noqa: BLE001 - the anchor's content made the Trainer fail: provider fault
        raise ProviderFault("replay_failed", f"{type(e).__name__}: {str(e)[:200]}", step=start) from e
    if init.hex() != steps[start]["state"]:
        return WindowResult(index, start, end, False, time.perf_counter() - t0, (), "replay did not start from the anchor")
    checks = []
    for r in replayed:
        f, s = r.fields, r.fields["step"]
        rec = steps[s]
        problems = []
        ranks = f["batches"] if len(f["batches"]) == world else by_rank(f["batches"][0], world)
        if D.step_data_digest(ranks).hex() != rec["data"]:
            problems.append("micro-batches differ")
        if f["num_items"] != rec["num_items"]:
            problems.append("num_items differs")
        if D.encode_float(f["lr"]) != rec["lr"]:
            problems.append(f"lr {f['lr']:.6g} != recorded {D.decode_float(rec['lr']):.6g}")
        loss_rec = D.decode_float(rec["loss"])
        state_equal = f["state"].hex() == rec["state"]
        distance = max_abs = None
        if tolerance:
            recorded = reader.checkpoint(s, schema)
            distance, max_abs = _distance(r.params, recorded)
            if not distance <= contract.audit.tolerance:
                problems.append(f"distance {distance:.3e} > tolerance {contract.audit.tolerance:.3e}")
            if not _close(f["loss"], loss_rec):
                problems.append(f"loss {f['loss']:.6g} != recorded {loss_rec:.6g}")
        else:
            if not state_equal:
                problems.append("state digest differs")
            if D.encode_float(f["loss"]) != rec["loss"]:
                problems.append(f"loss {f['loss']!r} != recorded {loss_rec!r}")
            if (None if f["grad_norm"] is None else D.encode_float(f["grad_norm"])) != rec["grad_norm"]:
                problems.append("grad norm differs")
        checks.append(StepCheck(s, not problems, state_equal, distance, max_abs, f["loss"] - loss_rec, "; ".join(problems)))
    if [c.step for c in checks] != list(range(start + 1, end + 1)):
        return WindowResult(index, start, end, False, time.perf_counter() - t0, tuple(checks), "replay stopped early")
    ok = all(c.ok for c in checks)
    return WindowResult(index, start, end, ok, time.perf_counter() - t0, tuple(checks))


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
    nonce_bytes = bytes.fromhex(nonce) if isinstance(nonce, str) else (nonce or os.urandom(16))
    base = dict(contract_digest=c.digest_hex(), mode=c.audit.mode, nonce=nonce_bytes.hex(), source=str(trace),
                tolerance=c.audit.tolerance, contract=c.canonical())  # fmt: skip
    failures: list[Failure] = []
    try:
        with tempfile.TemporaryDirectory(prefix="aftune-verify-") as tmp:
            work = Path(tmp)
            try:
                from .hub import local_copy

                if isinstance(trace, str) and trace.startswith("hf://"):
                    say(f"downloading {trace}")
                local = local_copy(trace, work, endpoint=endpoint, progress=progress)
                say("structural check")
                reader = TraceReader(local)
                integrity = check_structure(reader, c, work)
                if model is not None:
                    check_delivered(model, reader.schema(), integrity.root["final_state"])
            except ProviderFault as e:
                failures.append(failure_from("structure", e))
                return VerificationReport(FAIL, **base, failures=tuple(failures), seconds=time.perf_counter() - t0)
            root_hex = integrity.trace_root.hex()
            challenge = make_challenge(c, integrity.trace_root, nonce_bytes, windows)
            detection = Detection.compute(len(challenge.bounds), len(challenge.chosen))
            data = None
            if data_check:
                say(f"data check of all {integrity.num_steps} steps")
                data = _data_check(c, integrity, work, failures)
            todo = [i for i in challenge.chosen if only_windows is None or i in only_windows]
            if todo and c.training.world_size > 1 and c.audit.mode == "exact":
                raise VerifierEnvironmentError(
                    "unsupported", f"exact replay of a {c.training.world_size}-process trace needs that many "
                    f"processes: accelerate launch --num_processes {c.training.world_size} scripts/verify.py ...")  # fmt: skip
            results = check_windows(c, reader, integrity, challenge, todo, work, say=say, progress=progress)
            failures.extend(f for res in results for f in window_failures(res))
            verdict = PASS if not failures else FAIL
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
    *, say: Log = lambda _m: None, progress: bool = False, distributed: bool = False,
) -> list[WindowResult]:
    """Re-execute the windows ``todo`` (indices into ``challenge.bounds``); a provider fault in one
    window makes that window fail, the others still run."""
    from tqdm.auto import tqdm

    results = []
    for n, i in enumerate(tqdm(todo, desc="replaying windows", unit="window", disable=not progress), 1):
        start, end = challenge.bounds[i]
        say(f"replaying window {i} (steps {start + 1}-{end}) [{n}/{len(todo)}]")
        try:
            res = check_window(c, reader, integrity, i, start, end, work / f"w{i}", distributed=distributed)
        except ProviderFault as e:
            res = WindowResult(i, start, end, False, 0.0, (), f"{e.code}: {e.detail}")
        results.append(res)
    return results


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
    return out or [Failure("replay", "replay_failed", res.failure, res.start + 1)]


__all__ = ["Challenge", "check_structure", "check_windows", "make_challenge", "verify_trace", "window_bounds", "window_failures"]
