"""Cell challenges and openings: which (step, block) cells a nonce picks, and the provider's opening of them.

The client's nonce and the sealed trace root pick ``audit.cells`` cells uniformly from the
``max_steps x blocks`` grid (:func:`challenge_cells`). The provider *opens* them
(:func:`open_cells`): it re-runs each challenged step from its anchor through the contract's own
Trainer -- the same deterministic replay the verifier's window check uses -- with a
:class:`Regenerate` tracker that keeps the boundary tensors the step's cell table digests, and
writes, per challenged step, ``step-<t>.json`` (the cell table and the per-tensor digests of the
trainable and optimizer state before and after the step), ``step-<t>-batch.safetensors`` (the
micro-batches fed) and, per challenged block, ``step-<t>-block-<b>.safetensors`` (the block's
parameters and optimizer state before the step, its input activations, output gradients and
RNG states). Everything in an opening is checked against the chain by
:mod:`aftune_hf.cells.check`; nothing in it is trusted.

Example:
    >>> cells = challenge_cells(contract, trace_root, nonce)                  # doctest: +SKIP
    >>> open_cells(contract, "runs/trace", cells, "runs/openings")            # doctest: +SKIP
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import digest as D
from ..contract import Contract, load_contract
from ..live import snapshot, trainable_params
from ..safeio import atomic_save_safetensors, atomic_write_bytes
from .execute import _block_names
from .track import CellTracker, optimizer_digest, optimizer_tensors, table_digest

OPENING_FORMAT = "aftune-cells-opening"
OPENING_VERSION = 1


@dataclass(frozen=True, order=True)
class Cell:
    """One challenged cell: optimizer step ``step`` (1-based) of block ``block`` (0-based)."""

    step: int
    block: int


def challenge_cells(contract: Contract, trace_root: bytes, nonce: bytes, count: int | None = None) -> tuple[Cell, ...]:
    """The cells the client's ``nonce`` picks from the sealed trace, uniformly without replacement."""
    blocks = len(contract.audit.layer_blocks or ()) - 1
    if blocks < 1:
        raise ValueError("the contract has no audit.layer_blocks")
    n = contract.training.max_steps * blocks
    seed = D.hash_bytes("cells challenge", D.challenge_seed(trace_root, nonce))
    picked = D.sample_distinct(seed, n, contract.audit.cells if count is None else count)
    return tuple(Cell(i // blocks + 1, i % blocks) for i in picked)


def step_file(step: int, block: int | None = None, batch: bool = False) -> str:
    """The opening's file names (``docs/FORMAT.md``, Cells)."""
    stem = f"step-{step:08d}"
    if batch:
        return f"{stem}-batch.safetensors"
    return f"{stem}.json" if block is None else f"{stem}-block-{block:03d}.safetensors"


def tensor_digests(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    return {n: D.tensor_digest(t).hex() for n, t in tensors.items()}


class Regenerate(CellTracker):
    """A :class:`CellTracker` that keeps, for the challenged ``steps``, what their openings hold."""

    def __init__(self, boundaries: Sequence[int], steps: Iterable[int]) -> None:
        super().__init__(boundaries, keep=True)
        self.steps = set(steps)
        self.opened: dict[int, dict[str, Any]] = {}
        self.block_names: list[list[str]] = []
        self._before: dict[str, Any] | None = None

    def install(self, model: torch.nn.Module, trainer: Any) -> None:
        super().install(model, trainer)
        self.block_names = [_block_names(model, first, last) for first, last in self.blocks]

    def step_begin(self, step: int, model: Any, optimizer: Any) -> None:
        super().step_begin(step, model, optimizer)
        self._before = None
        if step in self.steps:
            self._before = {"params": snapshot(trainable_params(model)),
                            "optim": snapshot(optimizer_tensors(model, optimizer))}  # fmt: skip

    def step_end(self, step: int, model: Any, optimizer: Any) -> dict[str, bytes]:
        table = self.end()
        optim = optimizer_tensors(model, optimizer)
        if self._before is not None:
            self.opened[step] = {"table": table, "micro": self.kept, "names": self.block_names, "ties": self.ties, **self._before,
                                 "params_after": tensor_digests(trainable_params(model)), "optim_after": tensor_digests(optim)}  # fmt: skip
        return {"cells": table_digest(table), "optim": optimizer_digest(optim)}


def write_opening(out: Path, step: int, opened: Mapping[str, Any], blocks: Iterable[int]) -> list[Path]:
    """Write one challenged step's opening files for ``blocks`` into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    micro, names, ties = opened["micro"], opened["names"], opened["ties"]
    alias = dict(ties)
    manifest = {"format": OPENING_FORMAT, "format_version": OPENING_VERSION, "step": step, "table": opened["table"],
                "params_before": tensor_digests(opened["params"]), "params_after": opened["params_after"],
                "optim_before": tensor_digests(opened["optim"]), "optim_after": opened["optim_after"]}  # fmt: skip
    paths = [out / step_file(step), out / step_file(step, batch=True)]
    atomic_write_bytes(paths[0], D.canonical_json(manifest))
    batch = {f"{m}/{k[len('batch/'):]}": v for m, kept in enumerate(micro) for k, v in kept.items() if k.startswith("batch/")}
    atomic_save_safetensors(paths[1], batch, {"format": "pt"})
    last = len(names) - 1
    for b in sorted(set(blocks)):
        mine = {n for n in names[b] if n not in alias}  # a tied head's tensor is block 0's to update
        state = {alias.get(n, n) for n in names[b]}
        tensors = {f"param/{n}": opened["params"][n] for n in state if n in opened["params"]}
        tensors |= {f"optim/{k}": v for k, v in opened["optim"].items() if k.split("/")[1] in mine}
        for m, kept in enumerate(micro):
            tensors[f"rng/{m}"] = kept[f"rng/{b}"]
            if b == 0:
                tensors |= {f"tied/{k}/{m}": kept[f"tied/{k}"] for k in range(len(ties))}
            if b > 0:
                tensors[f"act_in/{m}"] = kept[f"act/{b - 1}"]
            if b < last:
                tensors[f"grad_out/{m}"] = kept[f"grad/{b}"]
        paths.append(out / step_file(step, b))
        atomic_save_safetensors(paths[-1], {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, {"format": "pt"})
    return paths


def open_cells(contract: Contract | str | Path, trace: str | Path, cells: Sequence[Cell], out: str | Path, *,
               workdir: str | Path | None = None, progress: bool = False) -> list[Path]:  # fmt: skip
    """Regenerate and write the openings of ``cells`` (the provider's side of a cell challenge).

    Each challenged step is re-run from the anchor before it, as the verifier's window replay
    would; steps sharing an anchor are regenerated in one replay. Returns the files written."""
    from ..replay import replay_window
    from ..trace import TraceReader
    from ..verify.derive import anchor_steps, derive_expected

    c = contract if isinstance(contract, Contract) else load_contract(contract)
    reader = TraceReader(trace)
    schema = reader.schema()
    anchors = anchor_steps(c)
    by_anchor: dict[int, dict[int, set[int]]] = {}
    for cell in cells:
        start = max(a for a in anchors if a < cell.step)
        by_anchor.setdefault(start, {}).setdefault(cell.step, set()).add(cell.block)
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="aftune-open-") as tmp:
        work = Path(workdir) if workdir is not None else Path(tmp)
        expected = derive_expected(c, work / "expected")
        groups = sorted(by_anchor.items())
        if progress:
            from tqdm.auto import tqdm

            groups = tqdm(groups, desc="opening cells", unit="replay")
        for start, steps in groups:
            tracker = Regenerate(c.audit.layer_blocks, steps)
            anchor = reader.anchor(start, schema) if start else None
            replay = replay_window(c, start, max(steps), anchor, work / f"replay-{start}", expected, cells=tracker)
            for step, blocks in sorted(steps.items()):
                written += write_opening(Path(out), step, replay.opened[step], blocks)
    manifest = {"format": OPENING_FORMAT, "format_version": OPENING_VERSION,
                "cells": [[x.step, x.block] for x in sorted(cells)]}  # fmt: skip
    atomic_write_bytes(Path(out) / "cells.json", json.dumps(manifest, indent=1).encode())
    return written
