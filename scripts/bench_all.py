"""Run every benchmark and write one table of headline figures against the targets.

    python scripts/bench_all.py [--quick] [--out runs/bench/table.md]

Runs scripts/bench_hash.py, bench_record.py (and its plain-vs-plain control), bench_verify.py and
bench_inference.py (batch 4 and batch 1), each in its own process, collects the figures each writes with ``--json``, and prints a
Markdown table (also written to ``--out``) with the machine it ran on. ``--quick`` uses fewer rounds
and steps (a smoke run, noisier figures). Every ratio is measured side by side inside its script.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

FULL = {
    "hash": ["bench_hash.py"],
    "record": ["bench_record.py", "--rounds", "8", "--steps", "16"],
    "record_control": ["bench_record.py", "--rounds", "4", "--steps", "16", "--control"],
    "verify": ["bench_verify.py", "--steps", "12", "--anchor-every", "4"],
    "inference_b4": ["bench_inference.py", "--batch", "4"],
    "inference_b1": ["bench_inference.py", "--batch", "1"],
}
QUICK = {
    "hash": ["bench_hash.py", "--mib", "128", "--repeats", "3"],
    "record": ["bench_record.py", "--rounds", "2", "--steps", "8"],
    "record_control": ["bench_record.py", "--rounds", "2", "--steps", "8", "--control"],
    "verify": ["bench_verify.py", "--steps", "8", "--anchor-every", "4"],
    "inference_b4": ["bench_inference.py", "--batch", "4", "--repeats", "2", "--new-tokens", "64"],
    "inference_b1": ["bench_inference.py", "--batch", "1", "--repeats", "2", "--new-tokens", "64"],
}


def rows(r: dict) -> list[tuple[str, str, str, bool | None]]:
    """(figure, measured, target, met) from the collected results."""
    h, rec, ver = r["hash"]["hash"], r["record"]["record"], r["verify"]["verify"]
    i4, i1 = r["inference_b4"]["inference"], r["inference_b1"]["inference"]
    lora, full = rec["tiny-lora"], rec["tiny-full"]
    ctl = r["record_control"]["record"]
    cpu = {k: (v["on_thread_ms"] + v["writer_cpu_ms"]) / (1000 * v["step_s"]) for k, v in rec.items()}
    bytes_step = max(lora["chain_bytes_per_step"], full["chain_bytes_per_step"])
    replay = max(ver["tiny-lora"]["replay_ratio"], ver["tiny-full"]["replay_ratio"])
    return [
        ("hashing, tensor_digest of a large tensor (in place)", f"{h['tensor_digest']:.2f} GB/s", "≥ 1 GB/s", h["tensor_digest"] >= 1 and h["zero_copy"]),
        ("hashing, state_digest of a 96 MB model state", f"{h['state_digest']:.2f} GB/s", "≥ 1 GB/s", h["state_digest"] >= 1),
        ("hashing, file_digest (mmap)", f"{h['file_digest']:.2f} GB/s", "≥ 1 GB/s", h["file_digest"] >= 1),
        ("recording, LoRA: audited / plain step time (median of per-round ratios; 95 % interval)",
         f"{lora['paired_ratio']:.3f} ({lora['paired_ci'][0]:.3f}–{lora['paired_ci'][1]:.3f})", "≤ 1.03", lora["paired_ratio"] <= 1.03),
        ("recording, full FT: audited / plain (median of per-round ratios; 95 % interval)",
         f"{full['paired_ratio']:.3f} ({full['paired_ci'][0]:.3f}–{full['paired_ci'][1]:.3f})", "≤ 1.10", full["paired_ratio"] <= 1.10),
        ("recording, LoRA / full FT: audited / plain over all steps (median; mean)",
         f"{lora['median_ratio']:.3f} / {full['median_ratio']:.3f}; {lora['mean_ratio']:.3f} / {full['mean_ratio']:.3f}", "", None),
        ("recorder CPU per step / step time (training thread + writer thread; LoRA / full)",
         f"{cpu['tiny-lora']:.1%} / {cpu['tiny-full']:.1%}", "", None),
        ("noise floor: plain / plain, same method (LoRA / full, median of per-round ratios; 95 % interval)",
         " / ".join(f"{c['paired_ratio']:.3f} ({c['paired_ci'][0]:.3f}–{c['paired_ci'][1]:.3f})"
                    for c in (ctl["tiny-lora"], ctl["tiny-full"])), "1.000", None),
        ("commitments per step (chain.jsonl bytes / steps, worst of LoRA/full)", f"{bytes_step:.0f} B", "≤ 512 B", bytes_step <= 512),
        ("replay / original step time (median per window, worst of LoRA/full)", f"{replay:.3f}", "≤ 1.2", replay <= 1.2),
        ("all-steps data check / training time", f"{max(v['data_check_share'] for v in ver.values()):.1%}", "", None),
        ("inference recording overhead, sampled (batch 4)", f"{i4['record_ratio_sampled']:.3f}", "", None),
        ("inference activation commitment", f"{i4['bytes_per_32_tokens']:.0f} B / 32 tokens", "TOPLOC: 258", None),
        ("inference verification speed-up vs generation, batch 4", f"{i4['verify_speedup']:.1f}×", "≥ 10×", i4["verify_speedup"] >= 10),
        ("inference verification speed-up vs generation, batch 1", f"{i1['verify_speedup']:.1f}×", "≥ 10×", i1["verify_speedup"] >= 10),
    ]  # fmt: skip


def table(r: dict, command: str, seconds: float) -> str:
    m = r["hash"]["machine"]
    out = [f"Command: `{command}` ({seconds / 60:.0f} min). Machine: {m['cores']} cores ({m['cpu']}), Python {m['python']}, "
           f"torch {m['torch']} ({m['torch_threads']} threads), transformers {m['transformers']}; model "
           f"{r['record']['params_m']:.1f} M parameters.", "", "| figure | measured | target | |", "|---|---|---|---|"]  # fmt: skip
    for name, value, target, met in rows(r):
        out.append(f"| {name} | {value} | {target} | {'' if met is None else '✓' if met else '✗'} |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and steps: a smoke run")
    ap.add_argument("--out", default="runs/bench/table.md")
    a = ap.parse_args()
    t0, results = time.perf_counter(), {}
    with tempfile.TemporaryDirectory(prefix="aftune-bench-all-") as tmp:
        for name, argv in (QUICK if a.quick else FULL).items():
            out = Path(tmp) / f"{name}.json"
            print(f"== {' '.join(argv)}", flush=True)
            p = subprocess.run([sys.executable, str(HERE / argv[0]), *argv[1:], "--json", str(out)], text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
            print(p.stdout, end="", flush=True)
            if p.returncode != 0 or not out.is_file():
                print(f"bench_all: {argv[0]} failed (exit {p.returncode})", file=sys.stderr)
                return 1
            results[name] = json.loads(out.read_text())
    text = table(results, "python scripts/bench_all.py" + (" --quick" if a.quick else ""), time.perf_counter() - t0)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
