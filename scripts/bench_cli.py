"""CLI start-up: `aftune plan` (lazy imports) against importing the recorder (what every command
used to import first), measured side by side, alternating, in one run.

    python scripts/bench_cli.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "aftune plan": [sys.executable, "-m", "aftune_hf", "plan", "--steps", "1000", "--anchor-every", "20"],
    "aftune contract": [sys.executable, "-m", "aftune_hf", "contract", "configs/tiny-lora.yaml"],
    "import aftune_hf.callback (old start-up)": [sys.executable, "-c", "import aftune_hf.callback"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    times: dict[str, list[float]] = {k: [] for k in COMMANDS}
    for _ in range(a.rounds):
        for name, cmd in COMMANDS.items():  # alternating: machine noise hits every command alike
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times[name].append(time.perf_counter() - t0)
    old = statistics.median(times["import aftune_hf.callback (old start-up)"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:42} median {med:6.2f} s  (min {min(ts):.2f}, max {max(ts):.2f})  old/this = {old / med:5.1f}x")


if __name__ == "__main__":
    main()
