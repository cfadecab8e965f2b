"""Run by tests/test_fsdp.py under `accelerate launch`: ``aftune_hf.launch`` (exact replay of an FSDP2
trace, every process one of its ranks) with tests/fsdp_cpu.py enabled, which accelerate needs to run
FSDP on CPU processes. Arguments as ``aftune_hf.launch``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aftune_hf.launch import run  # noqa: E402
from tests import fsdp_cpu  # noqa: E402

if __name__ == "__main__":
    fsdp_cpu.enable()
    run()
