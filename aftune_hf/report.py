"""What a verification produces: frozen result types, JSON in and out, and a text summary.

Example:
    >>> report = verify_trace("runs/trace", "contract.yaml", nonce="00ff00ff00ff00ff")   # doctest: +SKIP
    >>> report.verdict, report.exit_code                                     # doctest: +SKIP
    ('PASS', 0)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .safeio import atomic_write_bytes

PASS, FAIL, ERROR = "PASS", "FAIL", "ERROR"
INCONCLUSIVE = "INCONCLUSIVE"  # every check passed, but the checks were too few for the contract's audit.min_detection


def detection_probability(n: int, k: int, bad: int) -> float:
    """P(at least one of ``bad`` falsified windows is among ``k`` drawn of ``n`` without replacement)."""
    if bad <= 0:
        return 0.0
    if k >= n or bad > n - k:
        return 1.0
    return 1.0 - math.comb(n - bad, k) / math.comb(n, k)


@dataclass(frozen=True)
class Failure:
    """One reason for a FAIL: which check, which step, what was wrong."""

    check: str  # structure | data | replay | model
    code: str
    reason: str
    step: int | None = None


@dataclass(frozen=True)
class StepCheck:
    """A re-executed step compared with its commitment."""

    step: int
    ok: bool
    state_equal: bool
    distance: float | None = None  # relative L2 of replayed vs recorded trainable tensors
    max_abs: float | None = None
    loss_diff: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class WindowResult:
    """One challenged window ``(start, end]``."""

    index: int
    start: int
    end: int
    ok: bool
    seconds: float
    steps: tuple[StepCheck, ...] = ()
    failure: str = ""
    start_state: str = ""  # window 0: how the step-0 anchor differs from the contract's initial state
    end_state: str = ""  # how the replayed full end state differs from the anchor that closes the window


@dataclass(frozen=True)
class CallResult:
    """One checked inference call row: tokens re-checked by a teacher-forced pass."""

    call: int
    row: int
    ok: bool
    tokens: int
    max_activation_error: float = 0.0
    detail: str = ""
    token_score: float = 0.0  # mean per-token score (aftune_hf.verify.tokens): 0 for honest serving
    tokens_off: int = 0  # tokens that do not follow from the committed decoding


@dataclass(frozen=True)
class CellResult:
    """One challenged layer-block cell (step, block), re-executed from its opening (:mod:`aftune_hf.cells`)."""

    step: int
    block: int
    ok: bool
    detail: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class CellDetection:
    """How likely the cell challenge catches a provider who falsified a fraction of the cells, and its cost."""

    cells_total: int
    cells_checked: int
    by_fraction: dict[str, float] = field(default_factory=dict)
    fraction: float = 0.1
    achieved: float = 1.0
    required: float = 0.0
    flops_share: float = 0.0  # of the whole training run's FLOPs, re-executed by the checked cells
    peak_bytes: int = 0  # the largest checked block: its fp32 parameters, gradients and two Adam moments

    @classmethod
    def compute(cls, n: int, k: int, fraction: float = 0.1, required: float = 0.0, flops_share: float = 0.0,
                peak_bytes: int = 0) -> CellDetection:  # fmt: skip
        """Cells are drawn uniformly without replacement: none is always checked."""

        def p(f: float) -> float:
            return detection_probability(n, k, min(n, max(1, round(f * n))))

        by = {f"{f:.2f}": p(f) for f in (0.01, 0.05, 0.10)}
        return cls(n, k, by, fraction, p(fraction), required, flops_share, peak_bytes)


@dataclass(frozen=True)
class DataCheck:
    """The all-steps data check: every micro-batch digest re-derived from the client's data."""

    steps_checked: int
    mismatched_steps: tuple[int, ...]
    seconds: float


@dataclass(frozen=True)
class Download:
    """What a verification fetched of a trace on the Hub: only the files its checks opened."""

    files: int
    bytes: int
    trace_files: int
    trace_bytes: int


@dataclass(frozen=True)
class Detection:
    """How likely the challenge catches a provider who falsified a fraction of windows."""

    windows_total: int
    windows_checked: int
    by_fraction: dict[str, float] = field(default_factory=dict)
    min_fraction_99: float = 1.0
    fraction: float = 0.1  # the contract's audit.detect_fraction
    achieved: float = 1.0  # probability of catching a provider who falsified that fraction of the windows
    required: float = 0.0  # the contract's audit.min_detection

    @classmethod
    def compute(cls, n: int, k: int, fraction: float = 0.1, required: float = 0.0) -> Detection:
        """Conservative: the provider knows the first and last windows are always checked and
        falsifies only middle windows, of which ``k - 2`` of ``n - 2`` are sampled uniformly."""
        always = min(2, n)
        mid_n, mid_k = n - always, max(0, k - always)

        def p(f: float) -> float:
            if mid_n == 0:
                return 1.0
            bad = max(1, round(f * n))
            return detection_probability(mid_n, mid_k, min(bad, mid_n))

        by = {f"{f:.2f}": p(f) for f in (0.01, 0.05, 0.10)}
        min_f = next((b / n for b in range(1, n + 1) if p(b / n) >= 0.99), 1.0) if n else 1.0
        return cls(n, k, by, min_f, fraction, p(fraction), required)


def plan(steps: int, anchor_every: int, bad_fraction: float, confidence: float) -> dict[str, float | int]:
    """How many windows to re-execute to catch a provider who falsified ``bad_fraction`` of the
    windows with probability >= ``confidence`` (same conservative model as :class:`Detection`).

    Example:
        >>> plan(1000, 10, 0.05, 0.99)["windows"]
        60
    """
    if not (0 < bad_fraction <= 1 and 0 < confidence < 1 and steps >= 1 and anchor_every >= 1):
        raise ValueError("need steps >= 1, anchor_every >= 1, 0 < bad_fraction <= 1, 0 < confidence < 1")
    n = math.ceil(steps / anchor_every)
    for k in range(1, n + 1):
        d = Detection.compute(n, k)
        always, mid_n = min(2, n), n - min(2, n)
        bad = min(max(1, round(bad_fraction * n)), mid_n) if mid_n else 0
        p = 1.0 if mid_n == 0 else detection_probability(mid_n, max(0, k - always), bad)
        if p >= confidence:
            return {"windows_total": n, "windows": k, "probability": p, "share_reexecuted": min(1.0, k * anchor_every / steps),
                    "min_fraction_99": d.min_fraction_99}  # fmt: skip
    return {"windows_total": n, "windows": n, "probability": 1.0, "share_reexecuted": 1.0, "min_fraction_99": 1 / n}


@dataclass(frozen=True)
class VerificationReport:
    """The verdict and everything that supports it. ``verdict`` is PASS, FAIL or ERROR."""

    verdict: str
    contract_digest: str
    mode: str
    trace_root: str | None = None
    nonce: str | None = None
    seed: str | None = None
    num_steps: int = 0
    windows: tuple[WindowResult, ...] = ()
    data_check: DataCheck | None = None
    detection: Detection | None = None
    failures: tuple[Failure, ...] = ()
    error: str | None = None
    seconds: float = 0.0
    calls: tuple[CallResult, ...] = ()
    source: str | None = None  # the trace as given: a directory or hf://REPO@COMMIT_SHA (the pinned revision)
    tolerance: float = 0.0  # the contract's audit.tolerance (0 in exact mode: bit equality)
    contract: dict[str, Any] | None = None  # the client's contract, canonical form (no local paths)
    curve: tuple[tuple[int, float, float], ...] = ()  # (step, loss, lr) as recorded in the trace
    download: Download | None = None  # a trace on the Hub: what was downloaded of it
    cells: tuple[CellResult, ...] = ()  # layer-block cells checked from the provider's opening
    cell_detection: CellDetection | None = None

    @property
    def ok(self) -> bool:
        return self.verdict == PASS

    @property
    def exit_code(self) -> int:
        return {PASS: 0, FAIL: 1, INCONCLUSIVE: 3}.get(self.verdict, 2)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: str | Path) -> None:
        """Write the report as JSON, atomically."""
        atomic_write_bytes(path, json.dumps(self.to_json(), indent=2, sort_keys=True).encode())

    def summary(self) -> str:
        """A human-readable summary, verdict first."""
        lines = [f"{self.verdict}  trace {self.trace_root or '(structure not verified)'}  ({self.mode} mode)"]
        if self.error:
            lines.append(f"  error: {self.error}")
        for f in self.failures[:20]:
            where = f" step {f.step}" if f.step is not None else ""
            lines.append(f"  FAIL [{f.check}]{where}: {f.code}: {f.reason}")
        if self.data_check:
            d = self.data_check
            lines.append(f"  data check: {d.steps_checked} steps, {len(d.mismatched_steps)} mismatched, {d.seconds:.1f} s")
        for w in self.windows:
            dist = [s.distance for s in w.steps if s.distance is not None]
            extra = f", max distance {max(dist):.2e}" if dist else ""
            lines.append(f"  window {w.index} steps {w.start + 1}-{w.end}: {'ok' if w.ok else 'FAIL'} ({w.seconds:.1f} s{extra})")
        for c in self.calls:
            lines.append(f"  call {c.call} row {c.row}: {'ok' if c.ok else 'FAIL'} ({c.tokens} tokens, "
                         f"max activation error {c.max_activation_error:.1e}, token score {c.token_score:.1e})"
                         f"{': ' + c.detail if c.detail else ''}")  # fmt: skip
        if self.calls:
            tokens = sum(c.tokens for c in self.calls)
            score = sum(c.token_score * c.tokens for c in self.calls) / max(tokens, 1)
            lines.append(f"  tokens: {tokens} checked, {sum(c.tokens_off for c in self.calls)} do not follow from the "
                         f"committed decoding; mean token score {score:.2e} (0 for honest serving)")  # fmt: skip
        for c in self.cells:
            lines.append(f"  cell step {c.step} block {c.block}: {'ok' if c.ok else 'FAIL'} ({c.seconds:.2f} s)"
                         f"{': ' + c.detail if c.detail else ''}")  # fmt: skip
        if self.cell_detection:
            d = self.cell_detection
            probs = ", ".join(f"f={f}: {p:.1%}" for f, p in d.by_fraction.items())
            lines.append(f"  cell detection ({d.cells_checked}/{d.cells_total} cells): {probs}; cost {d.flops_share:.2%} of "
                         f"training FLOPs, peak {d.peak_bytes / 2**20:.1f} MiB of block state")  # fmt: skip
        if self.cell_detection and self.verdict == INCONCLUSIVE and not self.detection:
            d = self.cell_detection
            lines.insert(1, f"  no cheat found, but too few cells: a provider who falsified {d.fraction:.0%} of the cells is "
                         f"caught with {d.achieved:.1%}, the contract requires {d.required:.0%} (audit.min_detection); "
                         "challenge more --cells")  # fmt: skip
        if self.detection:
            d = self.detection
            probs = ", ".join(f"f={f}: {p:.1%}" for f, p in d.by_fraction.items())
            lines.append(f"  detection ({d.windows_checked}/{d.windows_total} windows): {probs}; "
                         f">=99% for f >= {d.min_fraction_99:.1%}")  # fmt: skip
            if self.verdict == INCONCLUSIVE:
                lines.insert(1, f"  no cheat found, but too few windows: a provider who falsified {d.fraction:.0%} of the "
                             f"windows is caught with {d.achieved:.1%}, the contract requires {d.required:.0%} "
                             f"(audit.min_detection); re-run with more --windows")  # fmt: skip
        if self.download:
            d = self.download
            lines.append(f"  downloaded {d.bytes:,} of {d.trace_bytes:,} bytes ({d.files} of {d.trace_files} files)")
        if self.nonce:
            lines.append(f"  nonce {self.nonce}")
        return "\n".join(lines)


def report_from_json(data: dict[str, Any]) -> VerificationReport:
    """Rebuild a report from :meth:`VerificationReport.to_json` output."""
    windows = tuple(
        WindowResult(**{**w, "steps": tuple(StepCheck(**s) for s in w["steps"])}) for w in data.get("windows", [])
    )
    return VerificationReport(
        **{
            **data,
            "windows": windows,
            "data_check": DataCheck(**{**data["data_check"], "mismatched_steps": tuple(data["data_check"]["mismatched_steps"])})
            if data.get("data_check") else None,
            "detection": Detection(**data["detection"]) if data.get("detection") else None,
            "failures": tuple(Failure(**f) for f in data.get("failures", [])),
            "calls": tuple(CallResult(**c) for c in data.get("calls", [])),
            "curve": tuple((int(s), float(l), float(r)) for s, l, r in data.get("curve", [])),
            "download": Download(**data["download"]) if data.get("download") else None,
            "cells": tuple(CellResult(**c) for c in data.get("cells", [])),
            "cell_detection": CellDetection(**data["cell_detection"]) if data.get("cell_detection") else None,
        }
    )  # fmt: skip


def merge_reports(parts: list[VerificationReport]) -> VerificationReport:
    """Combine reports of the same audit run on disjoint window shards (one per process).

    FAIL if any shard failed; otherwise ERROR if any shard errored; PASS only if all passed.
    """
    if not parts:
        raise ValueError("nothing to merge")
    first = parts[0]
    verdicts = {p.verdict for p in parts}
    verdict = next((v for v in (FAIL, ERROR, INCONCLUSIVE) if v in verdicts), PASS)
    windows = tuple(sorted((w for p in parts for w in p.windows), key=lambda w: w.index))
    failures = tuple(f for p in parts for f in p.failures)
    errors = [p.error for p in parts if p.error]
    data = next((p.data_check for p in parts if p.data_check is not None), None)
    return VerificationReport(
        verdict, first.contract_digest, first.mode, first.trace_root, first.nonce, first.seed, first.num_steps,
        windows, data, first.detection, failures, "; ".join(errors) or None, max(p.seconds for p in parts),
        tuple(c for p in parts for c in p.calls), first.source, first.tolerance, first.contract, first.curve,
        first.download, tuple(c for p in parts for c in p.cells), first.cell_detection,
    )  # fmt: skip
