"""A verification report as one self-contained HTML page (inline CSS and SVG; no scripts, no network).

Everything a trace supplies (failure reasons, paths, numbers) is escaped: a hostile trace must not be
able to put markup into the page a client forwards to their security team.

Example:
    >>> from aftune_hf.report import VerificationReport
    >>> page = render_html(VerificationReport("PASS", "ab" * 32, "exact"))
    >>> "PASS" in page and "<script" not in page
    True
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from . import __version__
from .report import FAIL, PASS, VerificationReport
from .safeio import atomic_write_bytes

_COLOURS = {PASS: "#1a7f37", FAIL: "#cf222e"}
_W, _H, _PAD = 760, 220, 48
_MAX_POINTS = 2000
_CSS = """body{font:14px/1.45 system-ui,sans-serif;max-width:860px;margin:24px auto;color:#1f2328;padding:0 12px}
h1{font-size:40px;margin:0;color:#fff;padding:14px 20px;border-radius:8px}h2{font-size:18px;margin:28px 0 8px}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #d0d7de;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f6f8fa}code{font:12px ui-monospace,monospace;word-break:break-all}
.bad{color:#cf222e;font-weight:600}.ok{color:#1a7f37}.muted{color:#656d76}svg{background:#fff;border:1px solid #d0d7de}"""


def render_html(report: VerificationReport) -> str:
    """The report as a standalone HTML page: verdict first, then what supports it."""
    r = report
    colour = _COLOURS.get(r.verdict, "#9a6700")
    parts = [
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>aftune verification: {escape(r.verdict)}</title>',
        f"<style>{_CSS}</style></head><body>",
        f'<h1 id="verdict" style="background:{colour}">{escape(r.verdict)}</h1>',
        f"<p>{escape(_headline(r))}</p>",
        _table(
            ["", ""],
            [
                ("trace root", _code(r.trace_root or "(structure not verified)")),
                ("trace (pinned revision)", _code(r.source or "")),
                ("contract digest", _code(r.contract_digest)),
                ("mode", escape(r.mode) + (f" (tolerance {r.tolerance:.3g} relative L2)" if r.mode == "tolerance" else "")),
                ("challenge nonce", _code(r.nonce or "")),
                ("challenge seed", _code(r.seed or "")),
                ("verification time", f"{r.seconds:.1f} s"),
            ],
        ),
    ]
    if r.error:
        parts.append(f'<h2>Error</h2><p class="bad">{escape(r.error)}</p>')
    parts.append(_failures(r))
    if r.mode != "inference":
        parts += [_windows(r), _cells(r), _data(r), _detection(r), _step_plot(r), _curves(r)]
    if r.calls:
        parts.append(_calls(r))
    if r.contract:
        parts.append("<h2>Contract (the client's copy)</h2>")
        parts.append(_table(["field", "value"], [(escape(k), _code(_readable(v))) for k, v in _flatten(r.contract)]))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(f'<p class="muted">aftune_hf {escape(__version__)}, rendered {stamp}.</p></body></html>')
    return "\n".join(p for p in parts if p)


def write_html(report: VerificationReport, path: str | Path) -> None:
    """Write :func:`render_html` of ``report`` to ``path``, atomically."""
    atomic_write_bytes(path, render_html(report).encode())


def _headline(r: VerificationReport) -> str:
    if r.mode == "inference":
        return f"{len(r.calls)} inference call rows re-checked, {sum(not c.ok for c in r.calls)} failed."
    checked = f"{len(r.windows)} of {r.detection.windows_total} windows" if r.detection else f"{len(r.windows)} windows"
    return f"{r.num_steps} training steps; {checked} re-executed; {len(r.failures)} failure(s)."


def _failures(r: VerificationReport) -> str:
    if not r.failures:
        return ""
    rows = [(escape(f.check), "" if f.step is None else str(f.step), _code(f.code), escape(f.reason)) for f in r.failures[:500]]
    more = f'<p class="muted">{len(r.failures) - 500} more in the JSON report.</p>' if len(r.failures) > 500 else ""
    return '<h2 id="failures">Failures</h2>' + _table(["check", "step", "code", "reason"], rows) + more


def _windows(r: VerificationReport) -> str:
    if not r.windows:
        return ""
    rows = []
    for w in r.windows:
        dist = [s.distance for s in w.steps if s.distance is not None]
        rows.append((str(w.index), f"{w.start + 1}–{w.end}", _status(w.ok), f"{w.seconds:.1f} s",
                     f"{max(dist):.2e}" if dist else ("bit-equal" if w.ok and w.steps else ""), escape(w.failure)))  # fmt: skip
    return "<h2>Re-executed windows</h2>" + _table(["window", "steps", "result", "time", "max distance", "note"], rows)


def _cells(r: VerificationReport) -> str:
    if not r.cells:
        return ""
    rows = [(str(c.step), str(c.block), _status(c.ok), f"{c.seconds:.2f} s", escape(c.detail)) for c in r.cells]
    out = "<h2>Layer-block cells</h2>" + _table(["step", "block", "result", "time", "note"], rows)
    d = r.cell_detection
    if d is not None:
        probs = ", ".join(f"{float(f):.0%} falsified: {p:.2%}" for f, p in d.by_fraction.items())
        out += (f"<p>{d.cells_checked} of {d.cells_total} cells re-executed ({d.flops_share:.2%} of the training FLOPs, "
                f"at most {d.peak_bytes / 2**20:.1f} MiB of block state); caught with probability {escape(probs)}.</p>")  # fmt: skip
    return out


def _data(r: VerificationReport) -> str:
    d = r.data_check
    if d is None:
        return ""
    bad = ", ".join(map(str, d.mismatched_steps[:50])) + (" …" if len(d.mismatched_steps) > 50 else "")
    return "<h2>All-steps data check</h2>" + _table(["", ""], [
        ("steps re-derived from the client's data", str(d.steps_checked)),
        ("steps whose micro-batches differ", f'<span class="bad">{len(d.mismatched_steps)}: {bad}</span>' if bad else '<span class="ok">0</span>'),
        ("time", f"{d.seconds:.1f} s"),
    ])  # fmt: skip


def _detection(r: VerificationReport) -> str:
    d = r.detection
    if d is None:
        return ""
    rows = [(f"{float(f):.0%}", f"{p:.2%}") for f, p in d.by_fraction.items()]
    return (f"<h2>Detection probability</h2><p>{d.windows_checked} of {d.windows_total} windows re-executed. "
            f"A provider who falsified this share of the windows is caught with probability (first and last windows "
            f"excluded, as a provider who knows they are always checked would do):</p>"
            + _table(["falsified windows", "probability caught"], rows)
            + f"<p>≥ 99 % for any falsified share ≥ {d.min_fraction_99:.1%}.</p>")  # fmt: skip


def _step_plot(r: VerificationReport) -> str:
    steps = [s for w in r.windows for s in w.steps]
    if not steps:
        return ""
    bad = [s.step for s in steps if not s.ok]
    if r.mode == "tolerance":
        floor = r.tolerance * 1e-3 if r.tolerance > 0 else 1e-16  # a log axis has no 0: bit-equal steps sit here
        pts = [(s.step, max(s.distance, floor)) for s in steps if s.distance is not None]
        svg = _chart("relative L2 distance, replayed vs recorded (log scale)", [("distance", pts, "#0969da")],
                     log_y=True, hline=("tolerance", r.tolerance), marks=bad, dots=True)  # fmt: skip
        caption = (f"Each replayed step's distance from the provider's checkpoint; the red line is the contract's "
                   f"tolerance. Bit-equal steps (distance 0) are drawn at {floor:.0e}.")  # fmt: skip
    else:
        pts = [(s.step, 0.0 if s.state_equal else 1.0) for s in steps]
        svg = _chart("state digest differs (1) or is bit-equal (0)", [("mismatch", pts, "#0969da")], marks=bad, dots=True)
        caption = "Exact mode: every replayed step's trainable state must be bit-equal to the committed digest."
    return f'<h2>Replayed steps</h2><p>{caption}</p><div id="distance-plot">{svg}</div>'


def _curves(r: VerificationReport) -> str:
    if not r.curve:
        return ""
    spans = [(w.start, w.end) for w in r.windows]
    loss = _chart("training loss (as recorded)", [("loss", [(s, l) for s, l, _ in r.curve], "#8250df")], spans=spans)
    lr = _chart("learning rate (as recorded)", [("lr", [(s, x) for s, _, x in r.curve], "#bc4c00")], spans=spans)
    return (f'<h2>Loss and learning rate</h2><p class="muted">From the trace; shaded: re-executed windows.</p>'
            f'<div id="loss-plot">{loss}</div><div id="lr-plot">{lr}</div>')  # fmt: skip


def _calls(r: VerificationReport) -> str:
    rows = [(str(c.call), str(c.row), _status(c.ok), str(c.tokens), f"{c.max_activation_error:.1e}", f"{c.token_score:.1e}",
             str(c.tokens_off), escape(c.detail)) for c in r.calls]  # fmt: skip
    head = ["call", "row", "result", "tokens", "max activation error", "token score", "tokens off", "note"]
    return "<h2>Inference calls</h2>" + _table(head, rows)


# --- small pieces ------------------------------------------------------------------------------------


def _chart(
    title: str,
    series: Sequence[tuple[str, Sequence[tuple[int, float | None]], str]],
    *,
    log_y: bool = False,
    hline: tuple[str, float] | None = None,
    spans: Iterable[tuple[int, int]] = (),
    marks: Sequence[int] = (),
    dots: bool = False,
) -> str:
    """An inline SVG line chart; non-finite values (and non-positive ones on a log axis) are left out."""

    def ok(y: float | None) -> bool:
        return y is not None and math.isfinite(y) and (y > 0 or not log_y)

    pts = [(x, y) for _, ps, _ in series for x, y in ps if ok(y)]
    if not pts:
        return f'<p class="muted">{escape(title)}: no finite values to plot.</p>'
    ys = [y for _, y in pts] + ([hline[1]] if hline and ok(hline[1]) else [])
    f = (lambda y: math.log10(y)) if log_y else (lambda y: y)
    x0, x1 = min(x for x, _ in pts), max(x for x, _ in pts)
    lo, hi = f(min(ys)), f(max(ys))
    spread = hi - lo if hi - lo > 1e-12 else 1.0
    y0, y1 = lo - 0.05 * spread, hi + 0.05 * spread
    sx = lambda x: _PAD + (x - x0) / max(x1 - x0, 1) * (_W - 2 * _PAD)  # noqa: E731
    sy = lambda y: _H - 30 - (f(y) - y0) / (y1 - y0) * (_H - 60)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" role="img">',
           f'<text x="{_PAD}" y="16" font-size="13">{escape(title)}</text>']  # fmt: skip
    for a, b in spans:
        xa, xb = sx(max(a, x0)), sx(min(b, x1))
        out.append(f'<rect x="{xa:.1f}" y="24" width="{max(xb - xa, 2):.1f}" height="{_H - 54}" fill="#ddf4ff"/>')
    out.append(f'<line x1="{_PAD}" y1="{_H - 30}" x2="{_W - _PAD}" y2="{_H - 30}" stroke="#656d76"/>')
    for v in {lo, hi}:
        label = f"{10 ** v:.1e}" if log_y else f"{v:.3g}"
        ty = _H - 30 - (v - y0) / (y1 - y0) * (_H - 60)
        out.append(f'<text x="2" y="{ty + 4:.1f}" font-size="10" fill="#656d76">{label}</text>')
    out.append(f'<text x="{_PAD}" y="{_H - 12}" font-size="10" fill="#656d76">step {x0}</text>')
    out.append(f'<text x="{_W - _PAD}" y="{_H - 12}" font-size="10" fill="#656d76" text-anchor="end">step {x1}</text>')
    if hline and ok(hline[1]):
        y = sy(hline[1])
        out.append(f'<line class="tolerance" x1="{_PAD}" y1="{y:.1f}" x2="{_W - _PAD}" y2="{y:.1f}" stroke="#cf222e" stroke-dasharray="6 4"/>')
        out.append(f'<text x="{_W - _PAD}" y="{y - 4:.1f}" font-size="10" fill="#cf222e" text-anchor="end">{escape(hline[0])}</text>')
    for label, ps, colour in series:
        good = [(x, y) for x, y in ps if ok(y)]
        stride = max(1, len(good) // _MAX_POINTS)
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good[::stride])
        out.append(f'<polyline class="series" data-label="{escape(label)}" fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>')
        if dots:
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>' for x, y in good[::stride]]
    for x in marks[:200]:
        out.append(f'<line class="failed-step" x1="{sx(x):.1f}" y1="24" x2="{sx(x):.1f}" y2="{_H - 30}" stroke="#cf222e"/>')
    return "".join(out) + "</svg>"


def _table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head) if any(head) else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{f'<tr>{th}</tr>' if th else ''}{body}</table>"


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        out += _flatten(v, f"{prefix}{k}.") if isinstance(v, Mapping) else [(f"{prefix}{k}", v)]
    return out


def _readable(v: Any) -> Any:
    """Contracts hold floats as exact hex strings (0x1.0624dd2f1a9fcp-10); show them as numbers."""
    if isinstance(v, str) and v.startswith(("0x", "-0x")) and "p" in v:
        try:
            return repr(float.fromhex(v))
        except ValueError:
            return v
    return v


def _code(v: Any) -> str:
    return f"<code>{escape(str(v))}</code>"


def _status(ok: bool) -> str:
    return '<span class="ok">ok</span>' if ok else '<span class="bad">FAIL</span>'


__all__ = ["render_html", "write_html"]
