"""The red-team kit: every attack in scripts/attacks/redteam.py is caught (FAIL)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_every_attack_is_caught():
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "attacks" / "redteam.py"), "--all"], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=1200)  # fmt: skip
    lines = [line for line in p.stdout.splitlines() if line and not line.startswith(" ")]
    verdicts = {line.split()[0]: line.split()[1] for line in lines if len(line.split()) > 1 and line.split()[1] in ("PASS", "FAIL", "ERROR")}
    assert len(verdicts) >= 13, p.stdout[-3000:] + p.stderr[-3000:]
    assert set(verdicts.values()) == {"FAIL"}, p.stdout[-3000:]
    assert p.returncode == 0 and f"{len(verdicts)}/{len(verdicts)} attacks caught" in p.stdout
    assert "temperature" in p.stdout and "distance" in p.stdout  # the reasons name what was caught
