"""Long fuzzing run: mutate an honest trace N times; the verifier must FAIL every mutation.

    python scripts/fuzz_trace.py --examples 2000 [--reseal] [--replay] [--seed 0] [--kinds anchor_state,flip]

Prints counts per mutation kind and per failure code, and every mutation that did not FAIL
(PASS, ERROR or an exception) -- each one would be a bug. ``--reseal`` plays a forger who recomputes
the chain, Merkle root, file digests and trace root after the edit; ``--replay`` also re-executes windows.
"""

from __future__ import annotations

import argparse
import collections
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import transformers
import yaml

from aftune_hf import AuditCallback
from aftune_hf.artifacts import dataset_digest
from aftune_hf.contract import load_contract
from aftune_hf.fuzz import KINDS, Mutation, apply_mutation, fingerprint, only_environment_changed, reseal
from aftune_hf.recipes.causal_lm import DEFAULT_DATASET, build, make_base_model
from aftune_hf.verify import verify_trace

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replay", action="store_true", help="also re-execute the challenged windows")
    ap.add_argument("--reseal", action="store_true", help="recompute every provider-side commitment after mutating")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated mutation kinds (default: all of {','.join(KINDS)})")
    a = ap.parse_args()
    kinds_used = [k for k in a.kinds.split(",") if k]
    if not kinds_used or set(kinds_used) - set(KINDS):
        ap.error(f"--kinds must name some of {', '.join(KINDS)}")
    transformers.logging.set_verbosity_error()
    work = Path(tempfile.mkdtemp(prefix="aftune-fuzz-"))
    digest = make_base_model(work / "base")
    data = yaml.safe_load((REPO / "configs" / "tiny-lora.yaml").read_text())
    data["base_model"] = {"path": str(work / "base"), "digest": digest}
    data["dataset"] = {"path": str(DEFAULT_DATASET), "digest": dataset_digest(DEFAULT_DATASET).hex()}
    data["training"]["max_steps"] = 4
    data["audit"].update(anchor_every=2, windows=2)
    (work / "c.yaml").write_text(yaml.safe_dump(data))
    contract = load_contract(work / "c.yaml")
    parts = build(contract, str(work / "o"), disable_tqdm=True, logging_steps=10**6)
    transformers.Trainer(**parts.trainer_kwargs(), callbacks=[AuditCallback(contract, work / "trace")]).train()
    rng = random.Random(a.seed)
    kinds, codes, bad, noop, informational = collections.Counter(), collections.Counter(), [], 0, 0
    t0 = time.perf_counter()
    for i in range(a.examples):
        m = Mutation(rng.choice(kinds_used), rng.randrange(10**6), rng.randrange(10**6), rng.randrange(10**6))
        copy = work / f"m{i}"
        shutil.copytree(work / "trace", copy)
        try:
            before = fingerprint(copy)
            what = apply_mutation(copy, m)
            if a.reseal:
                reseal(copy)
            if fingerprint(copy) == before:  # e.g. swapping two byte-identical files
                noop += 1
                shutil.rmtree(copy, ignore_errors=True)
                continue
            report = verify_trace(copy, contract, nonce="0000000000000000", only_windows=None if a.replay else ())
            kinds[m.kind] += 1
            if report.verdict != "FAIL" and a.reseal and only_environment_changed(work / "trace", copy):
                informational += 1  # the provider's self-reported environment is not verifiable by design
            elif report.verdict != "FAIL":
                bad.append(f"{m}: {what}: {report.verdict} {report.error or ''}")
            else:
                codes[report.failures[0].code] += 1
        except Exception:  # noqa: BLE001 - every exception is a finding
            bad.append(f"{m}: exception\n{traceback.format_exc()}")
        shutil.rmtree(copy, ignore_errors=True)
    print(f"{a.examples} mutations ({noop} left the trace unchanged, skipped) in {time.perf_counter() - t0:.0f} s; "
          f"by kind {dict(kinds)}")  # fmt: skip
    print(f"failure codes: {dict(codes.most_common())}")
    print(f"not FAIL: {len(bad)}" + (f" (plus {informational} resealed edits of the informational environment field)"
                                      if informational else ""))  # fmt: skip
    for line in bad[:20]:
        print("  " + line)
    shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
