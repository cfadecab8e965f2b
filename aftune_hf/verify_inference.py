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
from .generate import sampling_cdf, served_weights
from .live import trainable_params
from .replay import build_recipe
from .report import ERROR, FAIL, PASS, CallResult, Detection, Failure, VerificationReport
from .trace import TraceReader
from .trace.inference import InferenceLogReader
from .verify import check_structure, failure_from
from .verify.structure import parse_nonce

TIE_MARGIN = 1e-4  # relative to the largest |logit|: greedy ties within this are accepted
CDF_TOLERANCE = 1e-6  # a sampled uniform this close to its token's interval is accepted


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


def _teacher_forced(model: Any, tensors: Mapping[str, torch.Tensor], rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One forward pass over every row's prompt + output (right-padded): per row the final hidden
    states and logits at the positions that produced each output token."""
    seqs = [torch.cat([tensors[f"prompt.{r}"], tensors[f"output.{r}"]]) for r in range(rows)]
    width = max(len(x) for x in seqs)
    ids = torch.zeros(rows, width, dtype=torch.int64)
    mask = torch.zeros(rows, width, dtype=torch.int64)
    for r, x in enumerate(seqs):
        ids[r, : len(x)], mask[r, : len(x)] = x, 1
    hidden: list[torch.Tensor] = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda _m, a: hidden.append(a[0].detach()))
    try:
        with torch.no_grad():  # on the model's device (e.g. a GPU); the checks run on the CPU
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float().cpu()
    finally:
        handle.remove()
    h = hidden[-1].float().cpu()
    out = []
    for r in range(rows):
        p, n = len(tensors[f"prompt.{r}"]), len(tensors[f"output.{r}"])
        out.append((h[r, p - 1 : p - 1 + n], logits[r, p - 1 : p - 1 + n]))
    return out


def check_call(model: Any, record: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], rtol: float) -> list[CallResult]:
    """Teacher-force every row of a call and check activations and every token's decoding."""
    rows, call = record["rows"], record["call"]
    bad = [r for r in range(rows) if not len(tensors[f"prompt.{r}"]) or not len(tensors[f"output.{r}"])]
    if bad:
        return [CallResult(call, r, False, 0, 0.0, "empty prompt or output") for r in bad]
    forward = _teacher_forced(model, tensors, rows)
    return [check_row(record, tensors, r, h, logits, rtol) for r, (h, logits) in enumerate(forward)]


def check_row(record: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], row: int, h: torch.Tensor,
              logits: torch.Tensor, rtol: float) -> CallResult:  # fmt: skip
    """Check one row against its recomputed hidden states ``h`` and logits (one per output token)."""
    from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor

    cfg, call = record["config"], record["call"]
    prompt, output = tensors[f"prompt.{row}"], tensors[f"output.{row}"]
    idx, val = tensors[f"act_index.{row}"].long(), tensors[f"act_value.{row}"]
    n, p = len(output), len(prompt)
    if output[-1] != cfg["eos_token_id"] and n != cfg["max_new_tokens"] or n > cfg["max_new_tokens"]:
        return CallResult(call, row, False, n, 0.0, "output length inconsistent with eos/max_new_tokens")
    if idx.max() >= h.shape[-1] or idx.min() < 0:
        return CallResult(call, row, False, n, 0.0, "activation index out of range")
    got = h.gather(-1, idx[:, None])[:, 0]
    top = h.abs().max(-1).values
    err = float(((got - val).abs() / val.abs().clamp_min(1e-6)).max())
    if err > rtol or bool((got.abs() < top - rtol * top).any()):
        return CallResult(call, row, False, n, err, f"activations differ (max relative error {err:.2e} > {rtol:.0e})")
    seed = bytes.fromhex(record["seed"]) if record["seed"] else None
    if cfg["do_sample"] and seed is None:
        return CallResult(call, row, False, n, err, "sampled call without a seed")
    ids = torch.cat([prompt, output])[None]
    scores = logits.clone()
    if cfg["repetition_penalty"] is not None and D.decode_float(cfg["repetition_penalty"]) != 1.0:
        penalty = RepetitionPenaltyLogitsProcessor(D.decode_float(cfg["repetition_penalty"]))
        scores = torch.cat([penalty(ids[:, : p + t], scores[t : t + 1]) for t in range(n)])
    if cfg["min_new_tokens"]:
        eos = MinNewTokensLengthLogitsProcessor(p, cfg["min_new_tokens"], cfg["eos_token_id"])
        scores = torch.cat([eos(ids[:, : p + t], scores[t : t + 1]) for t in range(min(n, cfg["min_new_tokens"]))]
                           + [scores[cfg["min_new_tokens"] :]])  # fmt: skip
    chosen = output[:, None]
    if not cfg["do_sample"]:
        best = scores.max(-1).values
        margin = TIE_MARGIN * best.abs().clamp_min(1.0)
        wrong = (scores.gather(-1, chosen)[:, 0] < best - margin).nonzero()
        if len(wrong):
            return CallResult(call, row, False, n, err, f"token {int(wrong[0, 0])} is not the greedy choice")
        return CallResult(call, row, True, n, err)
    cdf = sampling_cdf(scores, ids[:, :p].expand(n, -1), cfg)
    u = torch.tensor([D.uniform(seed, row, t) for t in range(n)], dtype=cdf.dtype) * cdf[:, -1]
    hi = cdf.gather(-1, chosen)[:, 0]
    lo = torch.where(chosen[:, 0] > 0, cdf.gather(-1, (chosen - 1).clamp_min(0))[:, 0], torch.zeros_like(hi))
    outside = (u < lo - CDF_TOLERANCE) | (u > hi + CDF_TOLERANCE) | ((hi - lo <= 0) & ((u - lo).abs() > CDF_TOLERANCE))
    wrong = outside.nonzero()
    if len(wrong):
        return CallResult(call, row, False, n, err, f"token {int(wrong[0, 0])} does not follow from the committed sampling")
    return CallResult(call, row, True, n, err)


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
