"""Detection probability, the planner and report (de)serialisation."""

from __future__ import annotations

import subprocess
import sys

import pytest

from aftune_hf.report import (
    Detection, Failure, VerificationReport, WindowResult, detection_probability, merge_reports, plan, report_from_json,
)  # fmt: skip


def test_plan_reaches_the_confidence_with_the_fewest_windows():
    p = plan(1000, 10, 0.05, 0.99)
    assert p["windows_total"] == 100 and p["probability"] >= 0.99
    k = p["windows"]
    # one window fewer would not reach it (first and last windows are free for the provider to avoid)
    assert detection_probability(98, k - 3, 5) < 0.99 <= detection_probability(98, k - 2, 5)
    assert p["share_reexecuted"] == pytest.approx(k / 100)
    assert plan(12, 4, 0.01, 0.99)["windows"] == 3  # tiny runs: everything
    assert plan(10_000, 50, 0.10, 0.95)["windows"] < plan(10_000, 50, 0.01, 0.95)["windows"]
    with pytest.raises(ValueError):
        plan(100, 10, 0.0, 0.99)


def test_detection_is_conservative_about_the_always_checked_windows():
    d = Detection.compute(10, 4)
    assert d.by_fraction["0.10"] == pytest.approx(detection_probability(8, 2, 1))
    assert Detection.compute(3, 3).min_fraction_99 == pytest.approx(1 / 3)


def test_report_round_trip_and_merge():
    a = VerificationReport("PASS", "c" * 64, "exact", "r" * 64, "00", "s" * 64, 8,
                           (WindowResult(0, 0, 2, True, 1.0),), None, Detection.compute(4, 2))  # fmt: skip
    b = VerificationReport("FAIL", "c" * 64, "exact", "r" * 64, "00", "s" * 64, 8,
                           (WindowResult(3, 6, 8, False, 1.0),), None, None, (Failure("replay", "x", "y", 7),))  # fmt: skip
    assert report_from_json(a.to_json()) == a
    merged = merge_reports([a, b])
    assert merged.verdict == "FAIL" and [w.index for w in merged.windows] == [0, 3] and merged.exit_code == 1


def test_cli_plan():
    p = subprocess.run([sys.executable, "-m", "aftune_hf", "plan", "--steps", "1000", "--anchor-every", "10",
                        "--bad-fraction", "0.05"], capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0 and "60 of 100 windows" in p.stdout
    p = subprocess.run([sys.executable, "-m", "aftune_hf", "plan", "--steps", "10", "--anchor-every", "2",
                        "--bad-fraction", "2"], capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 2
