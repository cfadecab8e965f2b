"""Recording overhead: Trainer step time with vs without AuditCallback, measured side by side.

    python scripts/bench_record.py [--hidden 512 --layers 6 --steps 12 --rounds 4] [--control]
        [--kinds tiny-lora tiny-full tiny-full+cells] [--batch 16 --grad-accum 2 --precision bf16]
    python scripts/bench_record.py --pool run1.json run2.json ...   # pool the rounds of earlier runs

Builds a Llama-style base model large enough that one optimizer step takes >= 0.5 s on a
2-core CPU, then alternates plain and audited runs of the same contract (LoRA and full
fine-tune), in ABBA order (plain first in even rounds, audited first in odd ones: on this VM the
second run of a pair is often slower), and prints the median step time of each and their ratio.
``--control`` runs plain against plain: the noise floor of the same measurement.
"""

from __future__ import annotations

import random
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
from aftune_hf.trace import CHAIN


class StepTimer(transformers.TrainerCallback):
    """Wall time between consecutive step starts (includes every callback's on_step_end)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.starts.append(time.perf_counter())

    def on_train_end(self, args, state, control, **kwargs):
        self.starts.append(time.perf_counter())

    def durations(self, skip: int) -> list[float]:
        """Step times without the warm-up steps and without the last step (which also waits
        for the recorder's final flush, a one-off cost at the end of a run)."""
        return [b - a for a, b in zip(self.starts, self.starts[1:])][skip:-1]


class OnThread:
    """Time spent on the training thread inside AuditCallback's hooks and events, per step."""

    per_step: list[float] = []
    names = ("on_train_begin", "on_step_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end")

    writer_cpu: list[float] = []  # CPU seconds the writer thread spent on each step's commit

    @classmethod
    def install(cls) -> None:
        from aftune_hf.callback import AuditCallback
        from aftune_hf.observe import StepCapture

        for owner, names in ((AuditCallback, cls.names[1:]), (StepCapture, ("_pre", "_post"))):
            for name in names:
                setattr(owner, name, cls._timed(getattr(owner, name)))
        commit = AuditCallback._commit

        def timed_commit(*args, **kwargs):
            t = time.thread_time()
            try:
                return commit(*args, **kwargs)
            finally:
                cls.writer_cpu.append(time.thread_time() - t)

        AuditCallback._commit = timed_commit

    @classmethod
    def _timed(cls, fn):
        def wrapper(*args, **kwargs):
            if fn.__name__ == "on_step_begin":
                cls.per_step.append(0.0)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if cls.per_step:
                    cls.per_step[-1] += time.perf_counter() - t

        return wrapper


def median_ci(values: list[float], *, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % bootstrap interval of the median (percentile method, fixed seed)."""
    rnd = random.Random(seed)
    meds = sorted(statistics.median(rnd.choices(values, k=len(values))) for _ in range(resamples))
    return meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]


def run(contract_path: Path, work: Path, audited: bool, skip: int) -> list[float]:
    """Step times of one run; an audited run leaves its trace in ``work / "trace"``."""
    contract = load_contract(contract_path)
    parts = build(contract, str(work / "out"), disable_tqdm=True, logging_steps=1000)
    timer = StepTimer()
    callbacks = [timer]
    trace = work / "trace"
    shutil.rmtree(trace, ignore_errors=True)
    if audited:
        callbacks.append(AuditCallback(contract, trace))
    transformers.Trainer(**parts.trainer_kwargs(), callbacks=callbacks).train()
    return timer.durations(skip)


def pool(paths: list[str]) -> int:
    """Median and 95 % interval of the per-round ratios of several runs together."""
    import json

    rounds: dict[str, list[float]] = {}
    for path in paths:
        for kind, r in json.loads(Path(path).read_text())["record"].items():
            rounds.setdefault(kind, []).extend(r["round_ratios"])
    for kind, values in rounds.items():
        lo, hi = median_ci(values)
        print(f"{kind}: {len(values)} rounds from {len(paths)} runs: median audited / plain {statistics.median(values):.3f} "
              f"(95 % bootstrap interval {lo:.3f}-{hi:.3f}); per-round spread {min(values):.3f}-{max(values):.3f}")  # fmt: skip
    return 0


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=4, help="even, so each side runs first equally often")
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps not timed")
    ap.add_argument("--kinds", nargs="+", default=["tiny-lora", "tiny-full"], choices=["tiny-lora", "tiny-full", "tiny-full+cells"],
                    help="tiny-full+cells: the full fine-tune with layer-block cells, one layer per block")
    ap.add_argument("--batch", type=int, help="per-device batch size (default: the config's)")
    ap.add_argument("--grad-accum", type=int, help="gradient accumulation steps (default: the config's)")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default: the config's (fp32)")
    ap.add_argument("--control", action="store_true",
                    help="A/A run: the 'audited' side trains without the recorder too (measures the noise floor)")
    ap.add_argument("--pool", nargs="+", metavar="JSON",
                    help="do not run: pool the per-round ratios of earlier runs (their --json files) per kind")
    a = ap.parse_args()
    if a.pool:
        return pool(a.pool)
    transformers.logging.set_verbosity_error()
    OnThread.install()
    work = Path(tempfile.mkdtemp(prefix="aftune-bench-"))
    base, digest = bench_model(work, a.hidden, a.layers)
    training = {k: v for k, v in {"per_device_train_batch_size": a.batch, "gradient_accumulation_steps": a.grad_accum,
                                  "precision": a.precision}.items() if v is not None}  # fmt: skip
    results = {}
    for kind in a.kinds:
        audit = {"anchor_every": 8, "checkpoint_every": 4} if kind.startswith("tiny-full") else {}
        if kind.endswith("+cells"):
            audit["layer_blocks"] = list(range(a.layers + 1))
        path = bench_contract(work, kind.split("+")[0], base, digest, steps=a.steps, sections={"training": training},
                              name=kind.replace("+", "-"), **audit)  # fmt: skip
        contract = load_contract(path)
        plain, audited, on_thread, writer, rounds, chain_bytes = [], [], [], [], [], 0.0
        for i in range(a.rounds):  # interleaved, order alternating (ABBA): drift and order hit both sides alike
            pair = {}
            for audited_side in ((False, True) if i % 2 == 0 else (True, False)):
                if not audited_side:
                    pair["plain"] = run(path, work, False, a.skip)
                    continue
                OnThread.per_step, OnThread.writer_cpu = [], []
                pair["audited"] = run(path, work, not a.control, a.skip)
                on_thread += OnThread.per_step[a.skip : -1]  # the last step also waits for the final flush
                writer += OnThread.writer_cpu
                chain = work / "trace" / CHAIN  # the next plain run removes the trace
                chain_bytes = chain.stat().st_size / a.steps if chain.exists() else 0.0  # start record included
            plain += pair["plain"]
            audited += pair["audited"]
            rounds.append(statistics.median(pair["audited"]) / statistics.median(pair["plain"]))
        mp, ma = statistics.median(plain), statistics.median(audited)
        mean_p, mean_a = statistics.mean(plain), statistics.mean(audited)
        med_t, mean_t = (statistics.median(on_thread), statistics.mean(on_thread)) if on_thread else (0.0, 0.0)
        writer_t = statistics.mean(writer) if writer else 0.0
        results[kind] = {"median_ratio": ma / mp, "mean_ratio": mean_a / mean_p, "step_s": mp,
                         "round_ratios": rounds, "paired_ratio": statistics.median(rounds), "paired_ci": median_ci(rounds),
                         "on_thread_ms": 1000 * med_t, "chain_bytes_per_step": chain_bytes,
                         "writer_cpu_ms": 1000 * writer_t}  # fmt: skip
        print(f"{kind}: median step plain {mp:.3f} s, audited {ma:.3f} s, ratio {ma / mp:.3f}; "
              f"mean ratio {mean_a / mean_p:.3f}; per round (audited run / the plain run next to it, medians) "
              f"{' '.join(f'{r:.3f}' for r in rounds)} -> median {statistics.median(rounds):.3f} "
              f"(95 % bootstrap interval {median_ci(rounds)[0]:.3f}-{median_ci(rounds)[1]:.3f}); "
              f"on the training thread per step: median {1000 * med_t:.1f} ms "
              f"({med_t / mp:.1%}), mean {1000 * mean_t:.1f} ms ({mean_t / mp:.1%}); writer thread CPU per step "
              f"{1000 * writer_t:.1f} ms ({writer_t / mp:.1%}); n={len(plain)}+{len(audited)} steps; commitments {chain_bytes:.0f} bytes/step; "
              f"{contract.training.per_device_train_batch_size}x{contract.training.gradient_accumulation_steps} {contract.training.precision}; "
              f"audit {contract.audit}", flush=True)  # fmt: skip
    params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(base).parameters())
    import torch

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"model: hidden {a.hidden}, {a.layers} layers, {params / 1e6:.1f} M parameters; trained on {where}")
    emit(a.json, {"record": results, "params_m": params / 1e6, "device": where})
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
