"""Measure honest replay noise between the recording environment and this one.

Run it where you will verify (another CPU kernel path, another GPU, CPU vs GPU) on an honest
trace recorded where the provider trains. It runs what ``aftune verify`` runs in tolerance mode,
measuring instead of judging: the structural checks, the step-0 state against the one the
contract's recipe builds here (new tensors such as a LoRA adapter are drawn by kernels whose last
bits differ), every step's trainable tensors against the recorded checkpoint (per tensor), and each
window's full end state (optimizer moments, RNG, counters) against the anchor that closes it. The
proposed tolerance is ``safety`` times the largest distance seen.

Example:
    $ ATEN_CPU_CAPABILITY=default aftune calibrate runs/trace --contract contract.yaml
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from .contract import Contract, load_contract
from .live import snapshot, trainable_params
from .verify.derive import derive_expected, end_state_differences, moments_distance
from .replay import build_recipe, replay_window
from .trace import TraceReader
from .verify import check_structure, distance, window_bounds

MEASURE_ALL = 1.0  # the tolerance the structural checks run with here: they report, the distances decide


def calibrate(
    trace: str | Path, contract: Contract | str | Path, *, windows: int | None = None, safety: float = 10.0
) -> dict[str, Any]:
    """Replay windows here, return per-step distances and a proposed ``audit.tolerance``."""
    import torch

    c = contract if isinstance(contract, Contract) else load_contract(contract)
    reader = TraceReader(trace)
    schema = reader.schema()
    bounds = window_bounds(c)[: windows or None]
    per_step: dict[int, float] = {}
    moments: list[float] = []
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="aftune-calibrate-") as tmp:
        parts = build_recipe(c, Path(tmp) / "expected")
        initial_here = snapshot(trainable_params(parts.model))
        expected = derive_expected(c, Path(tmp) / "expected", parts)
        integrity = check_structure(reader, c, Path(tmp), expected, measure=True)  # raises where verify would FAIL
        steps = integrity.steps()
        initial = distance(reader.anchor(0, schema).params, initial_here)[0]
        for i, (start, end) in enumerate(bounds):
            anchor = reader.anchor(start, schema) if start else None
            replay = replay_window(c, start, end, anchor, Path(tmp) / f"w{i}", expected, keep_params=True)
            for r in replay.steps:
                s = r.fields["step"]
                if steps[s]["checkpoint"]:
                    per_step[s] = distance(r.params, reader.checkpoint(s, schema))[0]
            if replay.end is not None:  # the window's end state is compared too: Adam's moments, RNG, counters
                closing = reader.anchor(end, schema)
                moments.append(moments_distance(replay.end, closing))
                problems += [f"window {i} end state: {d}" for d in end_state_differences(replay.end, closing, tolerance=MEASURE_ALL)]
    values = (list(per_step.values()) or [0.0]) + moments + [initial]
    here = torch.cuda.get_device_name() if torch.cuda.is_available() else str(torch.backends.cpu.get_cpu_capability())
    proposed = max(max(values) * safety, 1e-9)
    summary = (
        f"replayed {len(per_step)} steps here ({here}); "
        f"honest relative L2 distance: max {max(values):.3e}, median {statistics.median(values):.3e} "
        f"(optimizer moments at window ends: max {max(moments, default=0.0):.3e}; step-0 state: {initial:.3e}); "
        f"proposed audit.tolerance: {proposed:.3e} ({safety:g}x the max)"
    )
    if problems:
        summary += "; NOT honest noise, verify would FAIL: " + "; ".join(problems[:4])
    return {"per_step": per_step, "moments": moments, "initial": initial, "problems": problems, "max": max(values), "median": statistics.median(values),
            "proposed_tolerance": proposed, "cpu_capability": str(torch.backends.cpu.get_cpu_capability()), "device": here,
            "summary": summary}  # fmt: skip
