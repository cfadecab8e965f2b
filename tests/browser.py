"""Open an HTML file in headless Chromium (Debian's ``chromium`` package): its DOM and a screenshot."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-extensions", "--no-first-run", "--hide-scrollbars", "--window-size=900,2400"]  # fmt: skip


def chromium() -> str:
    """The browser binary; a skip here, a failure in CI (``AFTUNE_REQUIRE_CHROMIUM=1``, set by .ci/run)."""
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        if os.environ.get("AFTUNE_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is required here (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return exe


def render_in_chromium(page: Path, screenshot: Path) -> str:
    """The page's DOM after rendering; writes a PNG screenshot and checks it is a real, non-empty image."""
    exe, url = chromium(), page.resolve().as_uri()
    profile = screenshot.parent / f".chromium-{screenshot.stem}"
    common = [exe, *FLAGS, f"--user-data-dir={profile}"]
    shot = subprocess.run([*common, f"--screenshot={screenshot}", url], capture_output=True, text=True, timeout=120)
    assert screenshot.is_file(), shot.stderr[-2000:]
    head = screenshot.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) == (900, 2400)
    assert screenshot.stat().st_size > 20_000  # text and plots, not a blank page
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0 and "<html" in dom.stdout, dom.stderr[-2000:]
    return dom.stdout
