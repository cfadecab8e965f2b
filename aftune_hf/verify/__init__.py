"""All pass/fail policy: structure, data, challenge, replay -> :class:`VerificationReport`.

Everything the provider controls that prevents verification is FAIL; only verifier-side
trouble (local disk, memory, missing dependency, the client's own files) is ERROR; PASS only
through every check and with the contract's detection power (else INCONCLUSIVE). Policy comes
from the client's contract, never from the trace. The stages: :mod:`.derive` (what the contract
implies), :mod:`.structure` (cheap whole-trace checks, the challenge), :mod:`.window` (re-executed
windows), :mod:`.delivered` (the model the client received).

Example:
    >>> from aftune_hf.verify import verify_trace
    >>> report = verify_trace("runs/trace", "configs/tiny-lora.yaml", nonce="a1b2c3a1b2c3a1b2")   # doctest: +SKIP
    >>> print(report.summary())                                                        # doctest: +SKIP
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import digest as D
from ..attest import MAX_BYTES as SIGNATURE_MAX_BYTES
from ..attest import check_signature, public_key
from ..contract import Contract, load_contract
from ..errors import AftuneError, ConfigError, ProviderFault, VerifierEnvironmentError
from ..replay import build_recipe
from ..report import ERROR, FAIL, INCONCLUSIVE, PASS, DataCheck, Detection, Failure, VerificationReport
from ..trace import SIGNATURE, Integrity, TraceReader
from .data import iter_data_steps
from .delivered import check_delivered
from .derive import derive_expected
from .env import adopt_environment
from .structure import (
    Challenge, check_client_artifacts, check_structure, failure_from, files_needed, make_challenge, parse_nonce,
    window_bounds,
)  # fmt: skip
from .window import Log, check_window, check_windows, distance, window_failures


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
    signer: str | Path | None = None,
    openings: str | Path | None = None,
    cells: int | None = None,
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
        signer: the provider's public key (PEM) the client pinned: the trace must carry a DSSE
            signature by it over this root and contract (:mod:`aftune_hf.attest`), else FAIL.
        openings: the provider's opening of the cells this nonce challenges (``aftune cells open``), a
            directory or ``hf://[datasets/]OWNER/NAME@COMMIT_SHA`` where the provider published it
            (``aftune push``): check them too (:mod:`aftune_hf.cells.check`); needs ``audit.layer_blocks``.
        cells: how many cells to challenge (default: the contract's ``audit.cells``).
    """
    say = log or (lambda _m: None)
    t0 = time.perf_counter()
    c = contract if isinstance(contract, Contract) else load_contract(contract)
    if windows is not None and (isinstance(windows, bool) or not isinstance(windows, int) or windows < (0 if openings else 1)):
        raise ConfigError("invalid_windows", f"windows must be an integer >= 1 (0: cells only), got {windows!r}")
    nonce_bytes = parse_nonce(nonce)
    if openings is not None and c.audit.layer_blocks is None:
        raise ConfigError("no_cells", "the contract has no audit.layer_blocks: there are no cells to check")
    if openings is not None and not str(openings).startswith("hf://") and not Path(openings).is_dir():
        raise ConfigError("openings_not_found", "no such directory (the provider's opening: aftune cells open)", path=str(openings))
    base = dict(contract_digest=c.digest_hex(), mode=c.audit.mode, nonce=nonce_bytes.hex(), source=str(trace),
                tolerance=c.audit.tolerance, contract=c.canonical())  # fmt: skip
    failures: list[Failure] = []
    import torch

    threads = torch.get_num_threads()  # exact mode adopts the recorder's; this process gets its own back
    try:
        if signer is not None:
            public_key(signer)  # the client's own key file: unreadable is ERROR, before any work
        with tempfile.TemporaryDirectory(prefix="aftune-verify-") as tmp:
            work = Path(tmp)
            say("checking your base model and dataset against the contract")
            check_client_artifacts(c)  # the client's own files: a mismatch is ERROR, never the provider's FAIL
            parts = build_recipe(c, work / "init")
            expected = derive_expected(c, work / "init", parts)
            remote = None
            try:
                needed = integrity = None
                if isinstance(trace, str) and trace.startswith("hf://"):
                    from ..hub_pull import open_remote

                    say(f"reading {trace} (only the files the checks open are downloaded)")
                    remote = open_remote(trace, work, endpoint=endpoint, progress=progress)
                    reader = TraceReader(remote=remote)
                    integrity = reader.check_integrity()  # the root first: it decides which files are opened
                    first = make_challenge(c, integrity.trace_root, nonce_bytes, windows)
                    needed = files_needed(first, [i for i in first.chosen if only_windows is None or i in only_windows])
                else:
                    reader = TraceReader(trace)
                say("structural check")
                integrity = check_structure(reader, c, work, expected, needed=needed, integrity=integrity)
                if signer is not None:
                    say("checking the provider's signature")
                    if SIGNATURE in reader.files:
                        reader.local(SIGNATURE, SIGNATURE_MAX_BYTES)
                    check_signature(reader.root, signer, root=integrity.trace_root, contract_digest=c.digest_hex(),
                                    count=integrity.num_steps)  # fmt: skip
                if model is not None:
                    check_delivered(model, reader.schema(), integrity.root["final_state"], parts.model,
                                    c.resolve(c.base_model.path))  # fmt: skip
            except ProviderFault as e:
                failures.append(failure_from("structure", e))
                return VerificationReport(FAIL, **base, failures=tuple(failures), seconds=time.perf_counter() - t0,
                                          download=remote and remote.download())  # fmt: skip
            env_diffs = adopt_environment(reader.header()["environment"], say) if c.audit.mode == "exact" else []
            root_hex = integrity.trace_root.hex()
            challenge = make_challenge(c, integrity.trace_root, nonce_bytes, windows or None)
            detection = None if windows == 0 else Detection.compute(len(challenge.bounds), len(challenge.chosen),
                                                                    c.audit.detect_fraction, c.audit.min_detection)  # fmt: skip
            data = None
            if data_check:
                say(f"data check of all {integrity.num_steps} steps")
                data = _data_check(c, integrity, work, failures)
            todo = [i for i in challenge.chosen if (only_windows is None or i in only_windows) and windows != 0]
            if todo and c.training.world_size > 1 and c.audit.mode == "exact":
                raise VerifierEnvironmentError(
                    "unsupported", f"exact replay of a {c.training.world_size}-process trace needs that many "
                    f"processes: aftune verify ... --processes {c.training.world_size}")  # fmt: skip
            results = check_windows(c, reader, integrity, challenge, todo, work, say=say, progress=progress,
                                    expected=expected)  # fmt: skip
            failures.extend(f for res in results for f in window_failures(res))
            cell_results, cell_detection = (), None
            if openings is not None:
                say("checking the challenged layer-block cells")
                if isinstance(openings, str) and openings.startswith("hf://"):  # published at a pinned revision
                    from ..hub import parse_uri
                    from ..hub_pull import pull

                    repo_id, revision, repo_type = parse_uri(openings)
                    say(f"downloading the opening {openings}")
                    openings = pull(repo_id, revision, work / "openings", repo_type=repo_type, endpoint=endpoint,
                                    progress=progress)  # fmt: skip
                cell_results, cell_detection = _cells_check(c, integrity, nonce_bytes, cells, openings, parts, progress)
                failures.extend(Failure("cells", r.detail.split(":")[0], r.detail, r.step) for r in cell_results if not r.ok)
            if env_diffs and failures and all(f.check == "replay" for f in failures):
                return VerificationReport(ERROR, **base, trace_root=root_hex, windows=tuple(results), failures=tuple(failures),
                                          seconds=time.perf_counter() - t0, error=environment_error(env_diffs))  # fmt: skip
            enough = any(d is not None and d.achieved >= d.required for d in (detection, cell_detection))
            verdict = FAIL if failures else PASS if enough else INCONCLUSIVE
            return VerificationReport(
                verdict, **base, trace_root=root_hex, seed=challenge.seed.hex(), num_steps=integrity.num_steps,
                windows=tuple(results), data_check=data, detection=detection, failures=tuple(failures),
                seconds=time.perf_counter() - t0, curve=_curve(integrity), download=remote and remote.download(),
                cells=tuple(cell_results), cell_detection=cell_detection,
            )  # fmt: skip
    except (OSError, MemoryError, ImportError, AftuneError) as e:
        if isinstance(e, ProviderFault):
            failures.append(failure_from("structure", e))
            return VerificationReport(FAIL, **base, failures=tuple(failures), seconds=time.perf_counter() - t0)
        return VerificationReport(ERROR, **base, error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def environment_error(diffs: Sequence[str]) -> str:
    """The ERROR of an exact replay that differs where the environment is not the recorder's."""
    return ("exact replay differs, but this is not the recorder's environment, so it proves nothing about the "
            "provider: " + "; ".join(diffs) + ". Verify where these match, or agree on tolerance mode.")  # fmt: skip


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


def _cells_check(c: Contract, integrity: Integrity, nonce: bytes, count: int | None, openings: str | Path, parts: Any,
                 progress: bool) -> tuple[list[Any], Any]:  # fmt: skip
    """The challenged cells, checked from the provider's opening, and what they achieve."""
    from ..cells.check import check_cells
    from ..cells.opening import challenge_cells
    from ..cells.plan import block_costs, checked_flops_share
    from ..live import unwrap
    from ..report import CellDetection

    config = unwrap(parts.model).config
    chosen = challenge_cells(c, integrity.trace_root, nonce, count)
    results = check_cells(c, integrity.steps(), chosen, openings, config, progress=progress)
    shares, sizes = block_costs(config, c.audit.layer_blocks)
    detection = CellDetection.compute(c.training.max_steps * len(shares), len(chosen), c.audit.detect_fraction,
                                      c.audit.min_detection, checked_flops_share(c.training.max_steps, shares, [x.block for x in chosen]),
                                      max(sizes[x.block] for x in chosen))  # fmt: skip
    return results, detection


def _curve(integrity: Integrity) -> tuple[tuple[int, float, float], ...]:
    """(step, loss, lr) of every step as the trace records it, for the report's plots."""
    return tuple((s, D.decode_float(r["loss"]), D.decode_float(r["lr"])) for s, r in sorted(integrity.steps().items()) if s)


__all__ = ["Challenge", "check_structure", "check_window", "check_windows", "distance", "failure_from", "make_challenge",
           "verify_trace", "window_bounds", "window_failures"]
