"""The verifier's cell check: authenticate a provider's opening against the chain, then re-execute the cell.

For a challenged step ``t`` the opening's cell table must be the one step ``t``'s record commits
(``cells``), its per-tensor digests of the trainable and optimizer state before and after the step
must join to the records' ``state``/``optim`` of steps ``t-1`` and ``t``, and its micro-batches to
the record's ``data``. For a challenged block every opened tensor must have the digest the table
or state lists. Then the block alone is re-executed (:mod:`aftune_hf.cells.execute`): forward
from the opened input at the RNG state the block started from, backward from the opened output
gradient (the last block: from its own loss, scaled as the Trainer scales it), gradient
clipping with the committed total norm, and the optimizer update of the block's parameters with
the contract's optimizer. Exact mode: the block's output, input gradient, per-tensor gradient
norms, loss, and updated parameters and optimizer state must be bit-equal to what was committed.
Every problem is a :class:`~aftune_hf.errors.ProviderFault` reported as a failed cell.

Example:
    >>> results = check_cells(contract, integrity.steps(), cells, "openings", config)   # doctest: +SKIP
    >>> all(r.ok for r in results)                                                      # doctest: +SKIP
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import digest as D
from ..contract import Contract
from ..report import CellResult
from ..errors import CommitmentError, ManifestMismatchError, ProviderFault, ReplayMismatchError, TraceFormatError
from ..safeio import loads_json_strict, parse_safetensors, read_regular_file
from .execute import _block_names, block_model, decoder_layers, meta_model, run_block
from .opening import OPENING_FORMAT, OPENING_VERSION, Cell, step_file
from .track import block_ranges, rng_hex, table_digest, tensor_hex, tensor_norms, tied_across_blocks, total_norm

MAX_JSON = 64 << 20
MAX_TENSORS = 64 << 30
_HEX = re.compile(r"^[0-9a-f]{64}$")
_MANIFEST_KEYS = {"format", "format_version", "step", "table", "params_before", "params_after", "optim_before", "optim_after"}


@dataclass(frozen=True)
class _Step:
    """A challenged step's opening, authenticated against the chain."""

    step: int
    table: dict[str, Any]
    before: dict[str, str]
    after: dict[str, str]
    optim_before: dict[str, str]
    optim_after: dict[str, str]
    batches: list[dict[str, torch.Tensor]]
    record: Mapping[str, Any]


def check_cells(contract: Contract, steps: Mapping[int, Mapping[str, Any]], cells: Sequence[Cell], openings: str | Path,
                config: Any, *, progress: bool = False) -> list[CellResult]:  # fmt: skip
    """Check each challenged cell of a trace (``steps``: its validated records by step) against the
    provider's ``openings`` directory; ``config`` is the model config of the contract's recipe."""
    root = Path(openings)
    ranges = block_ranges(contract.audit.layer_blocks)
    layout = _layout(config, ranges)
    results: list[CellResult] = []
    opened: dict[int, _Step | ProviderFault] = {}
    todo = sorted(cells)
    if progress:
        from tqdm.auto import tqdm

        todo = tqdm(todo, desc="checking cells", unit="cell")
    for cell in todo:
        t0 = time.perf_counter()
        try:
            if cell.step not in opened:
                try:
                    opened[cell.step] = _open_step(root, cell.step, steps, ranges, layout)
                except ProviderFault as e:
                    opened[cell.step] = e
            step = opened[cell.step]
            if isinstance(step, ProviderFault):
                raise step
            _check_cell(contract, config, root, step, cell.block, ranges, layout)
            results.append(CellResult(cell.step, cell.block, True, "", time.perf_counter() - t0))
        except ProviderFault as e:
            results.append(CellResult(cell.step, cell.block, False, f"{e.code}: {e.detail}"[:300], time.perf_counter() - t0))
        except (MemoryError, OSError):
            raise
        except Exception as e:  # noqa: BLE001 - the opened tensors made the block fail: provider fault
            results.append(CellResult(cell.step, cell.block, False, f"cell_failed: {type(e).__name__}: {str(e)[:200]}",
                                      time.perf_counter() - t0))  # fmt: skip
    return results


@dataclass(frozen=True)
class _Layout:
    """The model's parameter names in registration order, each block's, and the tied head (if any)."""

    order: list[str]
    blocks: list[list[str]]
    ties: list[tuple[str, str]]  # (head name, embedding name)


def _layout(config: Any, ranges: list[tuple[int, int]]) -> _Layout:
    """The model's parameter names in registration order, and each block's."""
    model = meta_model(config)
    n = len(decoder_layers(model)[1])
    if ranges[-1][1] != n:
        raise ManifestMismatchError("cells_layout", f"audit.layer_blocks ends at {ranges[-1][1]}; the model has {n} layers")
    return _Layout([name for name, _ in model.named_parameters()], [_block_names(model, f, last) for f, last in ranges],
                   tied_across_blocks(model, ranges))  # fmt: skip


def _read(root: Path, rel: str, max_bytes: int) -> bytes:
    try:
        return read_regular_file(root, rel, max_bytes=max_bytes)
    except FileNotFoundError:
        raise ManifestMismatchError("cell_unopened", "the provider did not open this cell", path=rel) from None


def _digests(v: Any, what: str) -> dict[str, str]:
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(h, str) and _HEX.fullmatch(h) for k, h in v.items()):
        raise TraceFormatError("opening_invalid", f"{what} must map names to digests")
    return v


def _root(digests: Mapping[str, str]) -> str:
    return D.named_digest({n: bytes.fromhex(h) for n, h in digests.items()}, D.STATE_TREE).hex()


def _check_table(table: Any, ranges: list[tuple[int, int]], micro: int, ties: int) -> None:
    def bad(why: str) -> TraceFormatError:
        return TraceFormatError("opening_invalid", f"cell table: {why}")

    if not isinstance(table, dict) or set(table) != {"blocks", "micro", "norms", "total"}:
        raise bad("keys")
    if table["blocks"] != [list(r) for r in ranges]:
        raise bad("its blocks are not the contract's audit.layer_blocks")
    if not isinstance(table["micro"], list) or len(table["micro"]) != micro:
        raise bad("one entry per micro-batch")
    n = len(ranges)
    for m in table["micro"]:
        if not isinstance(m, dict) or set(m) != {"rng", "act", "grad", "loss_grad"} | ({"tied"} if ties else set()):
            raise bad("micro-batch keys")
        for key, count in (("rng", n), ("act", n - 1), ("grad", n - 1), ("tied", ties)):
            if key == "tied" and not ties:
                continue
            if not isinstance(m[key], list) or len(m[key]) != count or not all(isinstance(h, str) and _HEX.fullmatch(h) for h in m[key]):
                raise bad(f"micro-batch {key}")
    floats = [table["total"], *(m["loss_grad"] for m in table["micro"])]
    if not isinstance(table["norms"], dict) or not table["norms"]:
        raise bad("norms")
    for v in [*floats, *table["norms"].values()]:
        try:
            ok = isinstance(v, str) and len(v) < 40 and D.encode_float(D.decode_float(v)) == v
        except (ValueError, OverflowError):
            ok = False
        if not ok:
            raise bad("a value is not an exact hex float")


def _f32(v: str) -> torch.Tensor:
    return torch.tensor(D.decode_float(v), dtype=torch.float32)


def _open_step(root: Path, step: int, steps: Mapping[int, Mapping[str, Any]], ranges: list[tuple[int, int]],
               layout: _Layout) -> _Step:  # fmt: skip
    """Read and authenticate step ``step``'s opening: every part must be what the chain commits."""
    rec, prev = steps.get(step), steps.get(step - 1)
    if rec is None or prev is None or "cells" not in rec:
        raise CommitmentError("cells_commitment", "the step record commits no cell table", step=step)
    rel = step_file(step)
    man = loads_json_strict(_read(root, rel, MAX_JSON), path=rel)
    if not isinstance(man, dict) or set(man) != _MANIFEST_KEYS or man["format"] != OPENING_FORMAT \
            or man["format_version"] != OPENING_VERSION or man["step"] != step:  # fmt: skip
        raise TraceFormatError("opening_invalid", "not a cell opening of this step", path=rel, step=step)
    parts = {k: _digests(man[k], k) for k in ("params_before", "params_after", "optim_before", "optim_after")}
    rel_batch = step_file(step, batch=True)
    loaded = parse_safetensors(_read(root, rel_batch, MAX_TENSORS), path=rel_batch)
    batches: list[dict[str, torch.Tensor]] = []
    for key, t in loaded.items():
        m, _, name = key.partition("/")
        if not m.isdigit() or int(m) >= len(loaded) or not name:
            raise TraceFormatError("opening_invalid", f"batch tensor {key!r}", path=rel_batch, step=step)
        while len(batches) <= int(m):
            batches.append({})
        batches[int(m)][name] = t
    table = man["table"]
    _check_table(table, ranges, len(batches), len(layout.ties))
    checks = {
        "cell table": table_digest(table).hex() == rec["cells"],
        "state before the step": _root(parts["params_before"]) == prev["state"],
        "state after the step": _root(parts["params_after"]) == rec["state"],
        "optimizer state after the step": _root(parts["optim_after"]) == rec["optim"],
        "optimizer state before the step": (_root(parts["optim_before"]) == prev["optim"]) if "optim" in prev
        else not parts["optim_before"],  # step 1: the Trainer's optimizer starts empty
        "micro-batches": D.step_data_digest([[D.batch_digest(b) for b in batches]]).hex() == rec["data"],
    }  # fmt: skip
    wrong = [k for k, ok in checks.items() if not ok]
    if wrong:
        raise CommitmentError("opening_mismatch", f"the opening's {', '.join(wrong)} is not what the chain commits", step=step)
    norms, order = table["norms"], layout.order
    if not set(norms) <= set(order) or D.encode_float(float(total_norm([_f32(norms[n]) for n in order if n in norms]))) != table["total"]:
        raise CommitmentError("opening_mismatch", "the table's total gradient norm is not the total of its tensors' norms", step=step)
    grad = D.encode_float(float(torch.ones(()) if rec["num_items"] is not None else torch.ones(()) / len(batches)))
    if any(m["loss_grad"] != grad for m in table["micro"]):
        raise CommitmentError("opening_mismatch", "the loss was not scaled as the Trainer scales it", step=step)
    return _Step(step, table, parts["params_before"], parts["params_after"], parts["optim_before"], parts["optim_after"],
                 batches, rec)  # fmt: skip


def _block_tensors(root: Path, step: _Step, block: int, layout: _Layout, last: int) -> dict[str, torch.Tensor]:
    """Block ``block``'s opened tensors, each the one the table or state lists."""
    rel = step_file(step.step, block)
    tensors = parse_safetensors(_read(root, rel, MAX_TENSORS), path=rel)
    alias = dict(layout.ties)
    names = layout.blocks[block]
    mine = {n for n in names if n not in alias}
    listed: dict[str, str] = {f"param/{n}": step.before[n] for n in {alias.get(n, n) for n in names} if n in step.before}
    listed |= {f"optim/{k}": h for k, h in step.optim_before.items() if k.split("/")[1] in mine}
    for m, micro in enumerate(step.table["micro"]):
        listed[f"rng/{m}"] = micro["rng"][block]
        if block == 0:
            listed |= {f"tied/{k}/{m}": h for k, h in enumerate(micro.get("tied", ()))}
        if block > 0:
            listed[f"act_in/{m}"] = micro["act"][block - 1]
        if block < last:
            listed[f"grad_out/{m}"] = micro["grad"][block]
    if set(tensors) != set(listed):
        raise TraceFormatError("opening_invalid", f"block tensors {sorted(set(tensors) ^ set(listed))[:4]} missing or extra",
                               path=rel, step=step.step)  # fmt: skip
    wrong = [k for k, t in tensors.items() if (rng_hex(t) if k.startswith("rng/") else D.tensor_digest(t).hex()) != listed[k]]
    if wrong:
        raise CommitmentError("opening_mismatch", f"opened {wrong[:3]} not the committed tensors", path=rel, step=step.step)
    return tensors


def _check_cell(contract: Contract, config: Any, root: Path, step: _Step, block: int, ranges: list[tuple[int, int]],
                layout: _Layout) -> None:  # fmt: skip
    first, end = ranges[block]
    last = len(ranges) - 1
    tensors = _block_tensors(root, step, block, layout, last)
    alias, names = dict(layout.ties), layout.blocks[block]
    weights = {n: tensors[f"param/{alias.get(n, n)}"] for n in names if f"param/{alias.get(n, n)}" in tensors}
    if set(weights) != set(names):
        raise CommitmentError("opening_mismatch", "the block's parameters are not all trainable state", step=step.step)
    model = block_model(config, first, end, weights).train()
    params = {n: model.get_parameter(n) for n in names if n not in alias}  # a tied head's copy: block 0 updates the tensor
    heads = [(k, model.get_parameter(a)) for k, (a, _) in enumerate(layout.ties)] if block == last else []
    shared = [(k, params[o]) for k, (_, o) in enumerate(layout.ties)] if block == 0 else []
    summed: dict[int, torch.Tensor] = {}
    table, problems = step.table, []
    loss = None
    for m, batch in enumerate(step.batches):
        for _, p in heads + shared:  # each micro-batch's own contribution to a tied tensor
            p.grad = None
        kwargs = dict(batch)
        if step.record["num_items"] is not None:
            kwargs["num_items_in_batch"] = torch.tensor(step.record["num_items"])
        inputs = kwargs.pop("input_ids") if block == 0 else tensors[f"act_in/{m}"]
        kwargs.pop("input_ids", None)
        grad_out = tensors[f"grad_out/{m}"] if block < last else _f32(table["micro"][m]["loss_grad"])
        run = run_block(model, first, end, inputs, grad_out, rng=tensors[f"rng/{m}"], accumulate=True, **kwargs)
        if block < last and tensor_hex(run.output) != table["micro"][m]["act"][block]:
            problems.append(f"micro-batch {m}: the block's output is not the committed boundary activation")
        if block < last and rng_hex(run.rng_out) != table["micro"][m]["rng"][block + 1]:
            problems.append(f"micro-batch {m}: the RNG state where the block ends is not the one the next block starts from")
        if block == last:
            value = run.output.detach().double()
            loss = value if loss is None else loss + value
        if block > 0 and tensor_hex(run.input_grad) != table["micro"][m]["grad"][block - 1]:
            problems.append(f"micro-batch {m}: the gradient at the block's input is not the committed one")
        if any(tensor_hex(p.grad) != table["micro"][m]["tied"][k] for k, p in heads):
            problems.append(f"micro-batch {m}: the head's share of the tied tensor's gradient is not the committed one")
        for k, p in shared:  # as autograd sums the two uses' gradients, then accumulates over micro-batches
            both = tensors[f"tied/{k}/{m}"] + p.grad
            summed[k] = both if k not in summed else summed[k].add_(both)
    for k, p in shared:
        p.grad = summed[k]
    if loss is not None and D.encode_float(float(loss)) != step.record["loss"]:
        problems.append(f"the loss {float(loss)!r} is not the recorded {D.decode_float(step.record['loss'])!r}")
    with_grad = [(n, p) for n, p in params.items() if p.grad is not None]
    norms = table["norms"]
    if {n for n, _ in with_grad} != set(norms) & set(params):
        problems.append("the tensors with a gradient are not those the table lists")
    elif with_grad:
        mine = tensor_norms([p.grad for _, p in with_grad])
        bad = [n for (n, _), v in zip(with_grad, mine) if D.encode_float(float(v)) != norms[n]]
        if bad:
            problems.append(f"gradient norms of {bad[:3]} differ from the table's")
    if problems:
        raise ReplayMismatchError("cell_mismatch", "; ".join(problems[:3]), step=step.step)
    opened = {k[len("optim/"):]: t for k, t in tensors.items() if k.startswith("optim/")}
    optimizer = _update(contract, model, params, with_grad, opened, D.decode_float(step.record["lr"]), _f32(table["total"]))
    after = {n: D.tensor_digest(p.detach()).hex() for n, p in params.items()}
    moved = [n for n in params if after[n] != step.after.get(n)]
    optim = _optimizer_digests(optimizer, params)
    mine = {k: h for k, h in step.optim_after.items() if k.split("/")[1] in set(params)}
    if moved or optim != mine:
        what = f"parameters {moved[:3]}" if moved else "optimizer state"
        raise ReplayMismatchError("cell_mismatch", f"the block's updated {what} are not the committed state after the step",
                                  step=step.step)  # fmt: skip


def _update(contract: Contract, model: torch.nn.Module, params: dict[str, torch.Tensor], with_grad: list[tuple[str, torch.Tensor]],
            opened: Mapping[str, torch.Tensor], lr: float, total: torch.Tensor) -> Any:  # fmt: skip
    """Clip with the committed total norm, then one step of the contract's optimizer on the block."""
    import transformers

    max_norm = contract.training.max_grad_norm
    if max_norm > 0 and with_grad:
        torch.nn.utils.clip_grads_with_norm_([p for _, p in with_grad], max_norm, total)
    args = _training_arguments(contract)
    cls, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args, model)
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    groups = [{"params": [p for n, p in params.items() if (n in decay) == d], "weight_decay": wd}
              for d, wd in ((True, args.weight_decay), (False, 0.0))]  # fmt: skip
    optimizer = cls([g for g in groups if g["params"]], **kwargs)
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in opened.items():  # state/<parameter>/<key>, as the anchors encode it
        _, name, k = key.split("/")
        by_param.setdefault(name, {})[k] = t.clone()
    for name, state in by_param.items():
        optimizer.state[params[name]] = state
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.step()
    return optimizer


_ARGS: dict[str, Any] = {}


def _training_arguments(contract: Contract) -> Any:
    """The contract's ``TrainingArguments`` (what the Trainer builds its optimizer from), made once."""
    import transformers

    key = contract.digest_hex()
    if key not in _ARGS:
        with tempfile.TemporaryDirectory(prefix="aftune-cell-") as tmp:
            _ARGS[key] = transformers.TrainingArguments(output_dir=tmp, report_to=[], **contract.training_arguments_kwargs())
    return _ARGS[key]


def _optimizer_digests(optimizer: Any, params: dict[str, torch.Tensor]) -> dict[str, str]:
    names = {id(p): n for n, p in params.items()}
    return {f"state/{names[id(p)]}/{k}": D.tensor_digest(v).hex() for p, st in optimizer.state.items()
            for k, v in st.items() if isinstance(v, torch.Tensor)}  # fmt: skip
