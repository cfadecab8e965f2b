"""Spot-check inference calls: one teacher-forced forward pass per call, with the audited weights.

For each checked call row: the served-weights digests must equal the audited model's (the final
state of the training trace, or the contract's base model); the prompt and output must equal what
the client holds (when it supplies them); the committed activations must match the recomputed
final hidden states within the contract's ``audit.inference_rtol``; and every output token must
follow from the committed decoding settings -- greedy: the argmax up to a tie margin; sampled: the
committed uniform falls in that token's interval of the recomputed distribution.

Example:
    >>> report = verify_inference("runs/log", "contract.yaml", trace="runs/trace", nonce="abababababababab")  # doctest: +SKIP
    >>> report.verdict                                                                       # doctest: +SKIP
    'PASS'
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import digest as D
from .attest import check_signature, public_key
from .contract import Contract, load_contract
from .errors import AftuneError, ConfigError, ProviderFault
from .generate import served_weights
from .live import trainable_params
from .replay import build_recipe
from .report import ERROR, FAIL, PASS, Detection, Failure, VerificationReport
from .trace import TraceReader
from .trace.inference import InferenceLogReader
from .verify import check_structure, failure_from
from .verify.structure import parse_nonce
from .verify.tokens import check_call

def audited_model(contract: Contract, trace: str | Path | None, work: Path) -> tuple[Any, str | None]:
    """The model the client audited: the trace's final state, or the contract's base model."""
    model = build_recipe(contract, work / "model").model
    if trace is None:
        return (model.unload() if hasattr(model, "unload") else model), None
    reader = TraceReader(trace)
    integrity = check_structure(reader, contract, work / "structure")
    final = reader.checkpoint(integrity.num_steps, reader.schema())
    with torch.no_grad():
        for n, p in trainable_params(model).items():
            p.copy_(final[n])
    return model, integrity.root["final_state"]


def load_client_calls(path: str | Path) -> dict[int, dict[str, Any]]:
    """The calls the client made: ``{"calls": [{"call": 1, "rows": [{"prompt": [...], "output": [...]}],
    "config": {"temperature": 0.7, ...}}]}`` (``config`` optional, any subset of the committed keys)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return {int(c["call"]): c for c in data["calls"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError("calls_invalid", f"cannot read the calls file: {e}", path=str(path)) from None


def _same_setting(want: Any, have: Any) -> bool:
    if isinstance(have, str):  # committed floats are hex
        have = D.decode_float(have)
    return want == have or (isinstance(want, (int, float)) and isinstance(have, float) and float(want) == have)


def verify_inference(
    log: str | Path,
    contract: Contract | str | Path,
    *,
    trace: str | Path | None = None,
    calls: str | Path | None = None,
    nonce: str | bytes | None = None,
    num_calls: int | None = None,
    log_fn: Any = None,
    endpoint: str | None = None,
    device: str = "cpu",
    signer: str | Path | None = None,
) -> VerificationReport:
    """Verify an inference log against the client's contract (and the audited training trace).

    ``device`` runs the teacher-forced passes there (e.g. ``"cuda"``); the token checks stay on the CPU.
    ``signer``: the provider's pinned public key; the log's newest root must be signed by it, for
    this contract (:mod:`aftune_hf.attest`), else FAIL.
    """
    say = log_fn or (lambda _m: None)
    t0 = time.perf_counter()
    c = contract if isinstance(contract, Contract) else load_contract(contract)
    nonce_bytes = parse_nonce(nonce)
    base = dict(contract_digest=c.digest_hex(), mode="inference", nonce=nonce_bytes.hex(), source=str(log),
                contract=c.canonical())  # fmt: skip
    failures: list[Failure] = []
    try:
        if signer is not None:
            public_key(signer)  # the client's own key file: unreadable is ERROR, before any work
        client = load_client_calls(calls) if calls else None
        with tempfile.TemporaryDirectory(prefix="aftune-verify-inference-") as tmp:
            try:
                from .hub import local_copy

                say("reading the inference log")
                (Path(tmp) / "log").mkdir()
                reader = InferenceLogReader(local_copy(log, Path(tmp) / "log", endpoint=endpoint))
                integrity = reader.check_integrity()
                if signer is not None:
                    check_signature(reader.root, signer, root=integrity.log_root, contract_digest=c.digest_hex(),
                                    count=integrity.num_calls)  # fmt: skip
                say("building the audited model")
                (Path(tmp) / "trace").mkdir()
                local_trace = None if trace is None else local_copy(trace, Path(tmp) / "trace", endpoint=endpoint)
                model, final_state = audited_model(c, local_trace, Path(tmp))
            except ProviderFault as e:
                failures.append(failure_from("structure", e))
                return VerificationReport(FAIL, **base, failures=tuple(failures), seconds=time.perf_counter() - t0)
            model.eval()
            expected = served_weights(model)
            model.to(device)
            entries = {e.record["call"]: e for e in integrity.entries}
            n = integrity.num_calls
            seed = D.challenge_seed(integrity.log_root, nonce_bytes)
            if client is not None:
                chosen = sorted(client)
            else:
                chosen = [i + 1 for i in D.sample_windows(seed, n, num_calls or c.audit.inference_calls)]
            results = []
            for call in chosen:
                entry = entries.get(call)
                if entry is None:
                    failures.append(Failure("inference", "call_unpublished", "no published root covers this call", call))
                    continue
                rec = entry.record
                if rec["weights"] != expected or (final_state and final_state not in (rec["weights"]["adapter"], rec["weights"]["params"])):
                    failures.append(Failure("inference", "weights_mismatch", "the call was not served by the audited model", call))
                    continue
                try:
                    tensors = reader.call_tensors(entry)
                except ProviderFault as e:
                    failures.append(Failure("inference", e.code, e.detail, call))
                    continue
                say(f"checking call {call} ({rec['rows']} rows)")
                mismatch = _client_mismatch(client.get(call) if client else None, rec, tensors)
                if mismatch:
                    failures.append(Failure("inference", "client_mismatch", mismatch, call))
                    continue
                for res in check_call(model, rec, tensors, c.audit.inference_rtol):
                    results.append(res)
                    if not res.ok:
                        failures.append(Failure("inference", "call_mismatch", f"row {res.row}: {res.detail}", call))
            verdict = PASS if not failures and results else FAIL
            if not results and not failures:
                failures.append(Failure("inference", "nothing_checked", "no call was checked"))
            return VerificationReport(
                verdict, **base, trace_root=integrity.log_root.hex(), seed=seed.hex(), num_steps=n,
                detection=Detection.compute(n, len(chosen)), failures=tuple(failures), calls=tuple(results),
                seconds=time.perf_counter() - t0,
            )  # fmt: skip
    except ConfigError:
        raise
    except (OSError, MemoryError, ImportError, AftuneError) as e:
        if isinstance(e, ProviderFault):
            failures.append(failure_from("structure", e))
            return VerificationReport(FAIL, **base, failures=tuple(failures), seconds=time.perf_counter() - t0)
        return VerificationReport(ERROR, **base, error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t0)


def _client_mismatch(client: Mapping[str, Any] | None, rec: Mapping[str, Any], tensors: Mapping[str, Any]) -> str:
    """What differs between the client's copy of a call and the committed one ('' if nothing)."""
    if client is None:
        return ""
    for key, want in (client.get("config") or {}).items():
        if key not in rec["config"] or not _same_setting(want, rec["config"][key]):
            return f"decoding setting {key}: client asked {want!r}, the log says {rec['config'].get(key)!r}"
    rows = client.get("rows", [])
    if len(rows) != rec["rows"]:
        return f"the client made {len(rows)} rows, the log has {rec['rows']}"
    for r, row in enumerate(rows):
        if list(row.get("prompt", [])) != tensors[f"prompt.{r}"].tolist():
            return f"row {r}: prompt differs from what the client sent"
        if list(row.get("output", [])) != tensors[f"output.{r}"].tolist():
            return f"row {r}: output differs from what the client received"
    return ""
