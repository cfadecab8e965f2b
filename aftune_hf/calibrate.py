"""Measure honest replay noise between the recording environment and this one.

Run it where you will verify (another CPU kernel path, another GPU, CPU vs GPU) on an honest
trace recorded where the provider trains: every window is re-executed here and each step's
trainable tensors are compared with the recorded checkpoint (per tensor), and each window's
optimizer moments with the anchor that closes it. The proposed tolerance is ``safety`` times the
largest distance seen.

Example:
    $ ATEN_CPU_CAPABILITY=default aftune calibrate runs/trace --contract contract.yaml
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from .contract import Contract, load_contract
from .verify.derive import derive_expected, moments_distance
from .replay import replay_window
from .trace import TraceReader
from .verify import distance, window_bounds


def calibrate(
    trace: str | Path, contract: Contract | str | Path, *, windows: int | None = None, safety: float = 10.0
) -> dict[str, Any]:
    """Replay windows here, return per-step distances and a proposed ``audit.tolerance``."""
    import torch

    c = contract if isinstance(contract, Contract) else load_contract(contract)
    reader = TraceReader(trace)
    integrity = reader.check_integrity()
    schema = reader.schema()
    steps = integrity.steps()
    bounds = window_bounds(c)[: windows or None]
    per_step: dict[int, float] = {}
    moments: list[float] = []
    with tempfile.TemporaryDirectory(prefix="aftune-calibrate-") as tmp:
        expected = derive_expected(c, Path(tmp) / "expected")
        for i, (start, end) in enumerate(bounds):
            anchor = reader.anchor(start, schema) if start else None
            replay = replay_window(c, start, end, anchor, Path(tmp) / f"w{i}", expected, keep_params=True)
            for r in replay.steps:
                s = r.fields["step"]
                if steps[s]["checkpoint"]:
                    per_step[s] = distance(r.params, reader.checkpoint(s, schema))[0]
            if replay.end is not None:  # the window's end state is compared too: Adam's moments
                moments.append(moments_distance(replay.end, reader.anchor(end, schema)))
    values = (list(per_step.values()) or [0.0]) + moments
    here = torch.cuda.get_device_name() if torch.cuda.is_available() else str(torch.backends.cpu.get_cpu_capability())
    proposed = max(max(values) * safety, 1e-9)
    summary = (
        f"replayed {len(per_step)} steps here ({here}); "
        f"honest relative L2 distance: max {max(values):.3e}, median {statistics.median(values):.3e} "
        f"(optimizer moments at window ends: max {max(moments, default=0.0):.3e}); "
        f"proposed audit.tolerance: {proposed:.3e} ({safety:g}x the max)"
    )
    return {"per_step": per_step, "moments": moments, "max": max(values), "median": statistics.median(values),
            "proposed_tolerance": proposed, "cpu_capability": str(torch.backends.cpu.get_cpu_capability()), "device": here,
            "summary": summary}  # fmt: skip
