"""How far can a bound-aware provider move the final model in tolerance mode? (issue 14)

    python scripts/attacks/drift_bound.py [--steps 16] [--anchor-every 4] [--tolerance 1e-6]

Records an honest tiny LoRA run and cheating runs that move every trainable tensor after every
step by ``c x per_step`` (relative L2, per tensor: the verifier's metric) in a random or fixed
direction, for per-step sizes of ``tolerance``, ``tolerance / sqrt(L)`` and ``tolerance / L``
(``L`` = window length) and ``c`` in 0.5 / 0.7 / 0.9. Every window is re-executed. Prints the
verdict, the largest replay distance seen, and how far the final model moved from the honest
one, relative to the honest update ``|theta_honest - theta_0|``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import safetensors.torch
import torch
import transformers

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from aftune_hf.trace import TraceReader, checkpoint_path  # noqa: E402
from scripts.attacks.cheats import BoundDrift  # noqa: E402
from scripts.attacks.redteam import Lab  # noqa: E402


def _flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[n].double().reshape(-1) for n in sorted(tensors)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--anchor-every", type=int, default=4)
    ap.add_argument("--tolerance", type=float, default=1e-6)
    a = ap.parse_args(argv)
    transformers.logging.set_verbosity_error()
    lab = Lab(Path(tempfile.mkdtemp(prefix="aftune-drift-")), steps=a.steps, anchor_every=a.anchor_every,
              tolerance=a.tolerance)  # fmt: skip
    L, tol = a.anchor_every, a.tolerance
    honest = lab.record("honest", mode="tolerance")
    reader = TraceReader(honest)
    theta0 = _flat(reader.anchor(0).params)
    theta_h = _flat(safetensors.torch.load_file(honest / checkpoint_path(a.steps)))
    update = float((theta_h - theta0).norm())
    print(f"tiny LoRA, {a.steps} steps, windows of L={L}, tolerance {tol:g}; honest update |theta_n - theta_0| = {update:.4g}")
    print(f"{'direction':9} {'per step':>14} {'c':>4} {'verdict':8} {'max distance':>12} {'final moved / honest update':>28}")
    for direction in ("random", "fixed"):
        for label, size in (("tol", tol), ("tol/sqrt(L)", tol / math.sqrt(L)), ("tol/L", tol / L)):
            for c in (0.5, 0.7, 0.9):
                name = f"{direction}-{label}-{c}".replace("/", "_")
                trace = lab.record(name, mode="tolerance", callbacks=[BoundDrift(c * size, direction)])
                report = lab.verify(trace, mode="tolerance")
                theta_c = _flat(safetensors.torch.load_file(trace / checkpoint_path(a.steps)))
                moved = float((theta_c - theta_h).norm()) / update
                dist = max((s.distance for w in report.windows for s in w.steps if s.distance is not None), default=0.0)
                print(f"{direction:9} {label:>14} {c:>4} {report.verdict:8} {dist:>12.3e} {moved:>28.3e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
