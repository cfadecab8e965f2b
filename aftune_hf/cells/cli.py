"""``aftune cells challenge|open`` and the cell lines of ``aftune plan``.

    aftune cells challenge TRACE --contract C.yaml --nonce HEX [--cells K]      # which cells a nonce picks
    aftune cells open TRACE --contract C.yaml --nonce HEX --out DIR [--cells K]  # the provider opens them
    aftune verify TRACE --contract C.yaml --nonce HEX --openings DIR [--windows 0]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..cliargs import positive_int
from ..errors import ConfigError


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("cells", help="layer-block cells: the cells a nonce challenges; the provider's opening of them")
    cells = p.add_subparsers(dest="cells_command", required=True)
    for name, text in (("challenge", "print the cells the nonce challenges"),
                       ("open", "provider: regenerate the challenged cells from the anchors and write their opening")):  # fmt: skip
        q = cells.add_parser(name, help=text)
        q.add_argument("trace")
        q.add_argument("--contract", required=True)
        q.add_argument("--nonce", required=True, help="the client's challenge nonce (hex)")
        q.add_argument("--cells", type=positive_int, help="cells to challenge (default: the contract's audit.cells)")
        if name == "open":
            q.add_argument("--out", required=True, help="where the opening is written (publish it as a new revision)")
        q.add_argument("--json", action="store_true")
        q.set_defaults(func=_challenge if name == "challenge" else _open)


def _chosen(args: argparse.Namespace) -> tuple[Any, Any]:
    from ..cliargs import trace_dir
    from ..contract import load_contract
    from ..trace import TraceReader
    from ..verify.structure import parse_nonce
    from .opening import challenge_cells

    trace_dir(args.trace)
    c = load_contract(args.contract)
    if c.audit.layer_blocks is None:
        raise ConfigError("no_cells", "the contract has no audit.layer_blocks: there are no cells")
    root = TraceReader(args.trace).check_integrity().trace_root
    return c, challenge_cells(c, root, parse_nonce(args.nonce), args.cells)


def _challenge(args: argparse.Namespace) -> int:
    _, cells = _chosen(args)
    rows = [{"step": x.step, "block": x.block} for x in cells]
    print(json.dumps(rows) if args.json else "\n".join(f"step {r['step']} block {r['block']}" for r in rows))
    return 0


def _open(args: argparse.Namespace) -> int:
    from .opening import open_cells

    c, cells = _chosen(args)
    files = open_cells(c, args.trace, cells, args.out, progress=not args.json)
    if args.json:
        print(json.dumps({"cells": [[x.step, x.block] for x in cells], "files": [str(f) for f in files]}))
    else:
        print(f"opened {len(cells)} cells in {args.out} ({len(files)} files); publish the folder and send its revision")
    return 0


def print_cell_plan(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """``aftune plan --model DIR --layer-blocks 0,2,4``: the cells beside the windows."""
    from transformers import AutoConfig

    from .plan import block_costs, cell_plan

    if not args.model:
        raise ConfigError("invalid_plan", "--layer-blocks needs --model (the base model directory)")
    try:
        blocks = [int(x) for x in args.layer_blocks.split(",")]
        shares, sizes = block_costs(AutoConfig.from_pretrained(args.model), blocks)
        p = cell_plan(args.steps, shares, args.bad_fraction, args.confidence)
    except ValueError as e:
        raise ConfigError("invalid_plan", str(e)) from None
    out["cells"] = {**p, "peak_bytes": max(sizes)}
    if not args.json:
        print(f"or {p['cells']} of {p['cells_total']} cells ({len(shares)} blocks; re-executing {p['flops_share']:.2%} of "
              f"training FLOPs, peak {max(sizes) / 2**20:.1f} MiB of block state) catch a provider who falsified "
              f"{args.bad_fraction:.1%} of the cells with probability {p['probability']:.2%}")  # fmt: skip
