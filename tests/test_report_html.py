"""The HTML report renders any report, escapes whatever a trace supplied, and `aftune report` reads JSON reports."""

from __future__ import annotations

import json
import math

from aftune_hf.cli import main
from aftune_hf.htmlreport import render_html
from aftune_hf.report import (CallResult, DataCheck, Detection, Failure, StepCheck, VerificationReport, WindowResult,
                              report_from_json)  # fmt: skip

HOSTILE = '<script>alert(1)</script><img src="http://evil.example/x.png">'


def _report(**over) -> VerificationReport:
    steps = (StepCheck(3, True, True, 0.0), StepCheck(4, False, False, 2e-3, 1e-3, 0.1, HOSTILE))
    base = dict(
        verdict="FAIL", contract_digest="ab" * 32, mode="tolerance", trace_root="cd" * 32, nonce="0a0a0a0a0a0a0a0a", seed="ef" * 32,
        num_steps=8, windows=(WindowResult(1, 2, 4, False, 0.5, steps),), data_check=DataCheck(8, (5,), 0.1),
        detection=Detection.compute(4, 2), failures=(Failure("replay", "replay_mismatch", HOSTILE, 4),), tolerance=1e-6,
        source=HOSTILE, contract={"name": HOSTILE, "training": {"learning_rate": (1e-3).hex()}},
        curve=((1, 5.5, 1e-4), (2, math.nan, 2e-4), (3, math.inf, 3e-4), (4, 5.4, 4e-4)),
    )  # fmt: skip
    return VerificationReport(**{**base, **over})


def test_trace_supplied_text_is_escaped():
    page = render_html(_report())
    assert "<script" not in page and "<img" not in page and "evil.example" in page  # shown as text, never as markup
    assert "&lt;script&gt;" in page


def test_plots_skip_non_finite_values_and_mark_failed_steps():
    page = render_html(_report())
    loss = page.split('id="loss-plot"', 1)[1].split("</div>", 1)[0]
    assert "nan" not in loss and "inf" not in loss
    assert len(loss.split('points="')[1].split('"')[0].split()) == 2  # steps 2 and 3 (nan, inf) left out
    assert 'class="failed-step"' in page and 'class="tolerance"' in page
    assert "0.001" in page  # hex floats of the contract shown as numbers


def test_exact_and_inference_and_error_reports_render():
    exact = render_html(_report(mode="exact", tolerance=0.0, verdict="PASS", failures=()))
    assert ">PASS</h1>" in exact and "bit-equal" in exact and 'id="failures"' not in exact
    inference = render_html(VerificationReport("PASS", "ab" * 32, "inference", calls=(CallResult(0, 0, True, 32),)))
    assert "Inference calls" in inference and "Replayed steps" not in inference
    error = render_html(VerificationReport("ERROR", "ab" * 32, "exact", error="OSError: disk full"))
    assert ">ERROR</h1>" in error and "disk full" in error


def test_report_command_round_trips_json(tmp_path, capsys):
    r = _report()
    (tmp_path / "r.json").write_text(json.dumps(r.to_json()))
    assert report_from_json(json.loads((tmp_path / "r.json").read_text())).curve[0] == (1, 5.5, 1e-4)
    assert main(["report", str(tmp_path / "r.json"), "--html", str(tmp_path / "r.html"), "--quiet"]) == 1  # FAIL
    assert (tmp_path / "r.html").read_text().startswith("<!doctype html>")
    assert main(["report", str(tmp_path / "r.json")]) == 1 and capsys.readouterr().out.startswith("FAIL")
    (tmp_path / "bad.json").write_text('{"verdict": 1}')
    assert main(["report", str(tmp_path / "bad.json")]) == 2
    assert main(["report", str(tmp_path / "missing.json")]) == 2
