"""Verification cost: replay time per window relative to the original steps, side by side.

    python scripts/bench_verify.py [--hidden 512 --layers 6 --steps 12 --anchor-every 4]

Records a LoRA and a full fine-tune with AuditCallback (timing every step), then re-executes
every window through the Trainer and prints, per window, the replayed steps' time against the
same steps' original time, plus the window's wall time (Trainer build, anchor materialisation,
resume) and the cost of the structural and all-steps data checks.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import transformers
from benchkit import bench_contract, bench_model, emit, parser

from aftune_hf import AuditCallback
from aftune_hf.contract import load_contract
from aftune_hf.recipes.causal_lm import build
from aftune_hf.replay import replay_window
from aftune_hf.trace import TraceReader
from aftune_hf.verify import check_structure, window_bounds


class StepTimes(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.t0, self.times = 0.0, {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times[state.global_step] = time.perf_counter() - self.t0


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--anchor-every", type=int, default=4)
    a = ap.parse_args()
    transformers.logging.set_verbosity_error()
    work = Path(tempfile.mkdtemp(prefix="aftune-bench-verify-"))
    base, digest = bench_model(work, a.hidden, a.layers)
    results = {}
    for kind in ("tiny-lora", "tiny-full"):
        path = bench_contract(work, kind, base, digest, steps=a.steps, anchor_every=a.anchor_every)
        contract = load_contract(path)
        timer = StepTimes()
        parts = build(contract, str(work / kind / "out"), disable_tqdm=True, logging_steps=10**6)
        cbs = [timer, AuditCallback(contract, work / kind / "trace")]
        transformers.Trainer(**parts.trainer_kwargs(), callbacks=cbs).train()
        reader = TraceReader(work / kind / "trace")
        t = time.perf_counter()
        check_structure(reader, contract, work / kind / "s")
        structural = time.perf_counter() - t
        from aftune_hf.verify.data import iter_data_steps

        t = time.perf_counter()
        n = sum(1 for _ in iter_data_steps(contract, work / kind / "d"))
        data_s = time.perf_counter() - t
        train_s = sum(timer.times.values())
        print(f"{kind}: {a.steps} steps trained in {train_s:.1f} s; structural check {structural:.2f} s; "
              f"data check of {n} steps {data_s:.2f} s ({data_s / train_s:.1%} of training)")  # fmt: skip
        from aftune_hf.verify.derive import derive_expected

        expected = derive_expected(contract, work / kind / "x")
        ratios = []
        for i, (s, e) in enumerate(window_bounds(contract)):
            t = time.perf_counter()
            anchor = reader.anchor(s, reader.schema()) if s else None
            steps = replay_window(contract, s, e, anchor, work / kind / f"w{i}", expected).steps
            wall = time.perf_counter() - t
            replay = sum(x.seconds for x in steps)
            original = sum(timer.times[x] for x in range(s + 1, e + 1))
            ratios.append(replay / original)
            print(f"  window {i} (steps {s + 1}-{e}): replayed steps {replay:.2f} s vs original {original:.2f} s "
                  f"= {replay / original:.3f}x; window wall time {wall:.2f} s = {wall / original:.2f}x")  # fmt: skip
        print(f"  median replay/original step time: {statistics.median(ratios):.3f}x")
        results[kind] = {"replay_ratio": statistics.median(ratios), "data_check_share": data_s / train_s,
                         "structural_s": structural}  # fmt: skip
    emit(a.json, {"verify": results})
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
