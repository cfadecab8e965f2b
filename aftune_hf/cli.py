"""The ``aftune`` console script.

    aftune contract FILE          validate a contract, print its digest
    aftune inspect TRACE          check a trace's integrity and summarise it

Exit codes: 0 success, 1 the trace failed a check (provider fault), 2 usage or
environment error. Set ``AFTUNE_DEBUG=1`` for tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from . import __version__
from .errors import AftuneError, ConfigError, ProviderFault


def _contract(args: argparse.Namespace) -> int:
    from .artifacts import check_artifacts
    from .contract import load_contract

    c = load_contract(args.file)
    if args.check_artifacts:
        check_artifacts(c)
    if args.json:
        print(json.dumps({"digest": c.digest_hex(), "contract": c.canonical()}, indent=2))
    else:
        print(c.digest_hex())
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .records import hex_float
    from .trace import TraceReader

    if not os.path.isdir(args.trace):
        raise ConfigError("trace_not_found", "no such directory", path=args.trace)
    reader = TraceReader(args.trace)
    integrity = reader.check_integrity()
    header = reader.header()
    steps = [e.record for e in integrity.entries if e.record["kind"] == "step"]
    summary = {
        "trace_root": integrity.trace_root.hex(),
        "run_id": header["run_id"],
        "contract_digest": header["contract_digest"],
        "num_steps": integrity.num_steps,
        "num_records": len(integrity.entries),
        "resumes": sum(e.record["kind"] == "resume" for e in integrity.entries),
        "checkpoints": sum(r["checkpoint"] for r in steps),
        "anchors": [r["step"] for r in integrity.steps().values() if r["anchor"]],
        "final_state": integrity.root["final_state"],
        "environment": header["environment"],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for k in ("trace_root", "run_id", "contract_digest", "num_steps", "num_records", "resumes", "checkpoints", "anchors", "final_state"):
        print(f"{k:16} {summary[k]}")
    print(f"{'step':>6} {'loss':>10} {'lr':>10} {'micro-batches':>14}")
    for r in steps:
        print(f"{r['step']:>6} {hex_float(r, 'loss'):>10.4f} {hex_float(r, 'lr'):>10.3g} {sum(map(len, r['batches'])):>14}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aftune", description="Auditable fine-tuning for the Hugging Face stack.")
    parser.add_argument("--version", action="version", version=f"aftune_hf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("contract", help="validate a contract and print its digest")
    p.add_argument("file")
    p.add_argument("--check-artifacts", action="store_true", help="also hash the local base model and dataset")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_contract)
    p = sub.add_parser("inspect", help="check a trace's integrity and summarise it")
    p.add_argument("trace")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AftuneError as e:
        if os.environ.get("AFTUNE_DEBUG"):
            raise
        print(f"aftune: {'FAIL' if isinstance(e, ProviderFault) else 'error'}: {e}", file=sys.stderr)
        return 1 if isinstance(e, ProviderFault) else 2


if __name__ == "__main__":
    raise SystemExit(main())
