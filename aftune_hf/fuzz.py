"""Mutations of an honest trace, for fuzzing the verifier (tests/test_fuzz.py, scripts/fuzz_trace.py).

Each mutation is a small, provider-style edit of one trace copy: flip a bit, truncate a file,
drop/duplicate/rename a file, edit a JSON field, swap two step files. The verifier must answer
FAIL for every one of them -- never PASS, never ERROR, never an exception.

Example:
    >>> m = Mutation("flip", 3, 1234, 5)
    >>> apply_mutation(Path("copy-of-trace"), m)   # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = ("flip", "truncate", "drop", "duplicate", "rename", "json_edit", "swap", "anchor_state")
# what an anchor_state mutation edits: optimizer moments, RNG tensors, or a value in the anchor's JSON
ANCHOR_TARGETS = ("optimizer", "rng", "meta")
JSON_VALUES: tuple[Any, ...] = (None, 0, -1, 2**53 + 1, "", "x" * 64, "0" * 64, [], {}, True, 1.5, {"float": "nan"})


@dataclass(frozen=True)
class Mutation:
    """``kind`` applied to the ``a``-th file (sorted), with parameters ``b`` and ``c``."""

    kind: str
    a: int
    b: int
    c: int


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def apply_mutation(root: Path, m: Mutation) -> str:
    """Apply ``m`` to the trace copy at ``root``; return a description."""
    files = _files(root)
    f = files[m.a % len(files)]
    rel = f.relative_to(root).as_posix()
    data = f.read_bytes()
    if m.kind == "flip" and data:
        i = m.b % len(data)
        f.write_bytes(data[:i] + bytes([data[i] ^ (1 << (m.c % 8))]) + data[i + 1 :])
        return f"flip bit {m.c % 8} of byte {i} in {rel}"
    if m.kind == "truncate" and data:
        n = m.b % len(data)
        f.write_bytes(data[:n])
        return f"truncate {rel} to {n} bytes"
    if m.kind == "drop":
        f.unlink()
        return f"drop {rel}"
    if m.kind == "duplicate":
        target = f.with_name(f.stem + "-copy" + f.suffix)
        shutil.copy(f, target)
        return f"duplicate {rel}"
    if m.kind == "rename":
        other = files[m.b % len(files)]
        if other == f:
            target = f.with_name("renamed" + f.suffix)
            f.rename(target)
            return f"rename {rel} to {target.name}"
        other_data = other.read_bytes()
        f.unlink()
        other.write_bytes(data)
        return f"move {rel} over {other.relative_to(root).as_posix()} (old content of that file dropped: {len(other_data)} bytes)"
    if m.kind == "json_edit" and f.suffix in (".json", ".jsonl"):
        lines = data.decode().splitlines()
        line_no = m.b % max(1, len(lines))
        obj = json.loads(lines[line_no])
        keys = _paths(obj)
        path = keys[m.c % len(keys)]
        old = _get(obj, path)
        value = next(v for i in range(len(JSON_VALUES))
                     if (v := JSON_VALUES[(m.b + m.c + i) % len(JSON_VALUES)]) != old or type(v) is not type(old))  # fmt: skip
        _set(obj, path, value)
        lines[line_no] = json.dumps(obj, sort_keys=True, separators=(",", ":"))
        f.write_text("\n".join(lines) + ("\n" if data.endswith(b"\n") else ""))
        return f"edit {'/'.join(map(str, path))} in line {line_no} of {rel}"
    if m.kind == "swap":
        steps = [p for p in files if p.suffix == ".safetensors"]
        x, y = steps[m.b % len(steps)], steps[m.c % len(steps)]
        if x == y:
            y = steps[(m.c + 1) % len(steps)]
        bx, by = x.read_bytes(), y.read_bytes()
        x.write_bytes(by)
        y.write_bytes(bx)
        return f"swap {x.relative_to(root).as_posix()} and {y.relative_to(root).as_posix()}"
    if m.kind == "anchor_state":
        anchors = sorted(p for p in root.glob("anchors/*/step-*") if p.is_dir())
        if anchors:
            return _anchor_state(root, anchors[m.a % len(anchors)], m)
    # fall back to a bit flip in the first byte so every mutation changes something
    f.write_bytes(bytes([data[0] ^ 1]) + data[1:] if data else b"x")
    return f"flip the first byte of {rel}"


def _anchor_state(root: Path, anchor: Path, m: Mutation) -> str:
    """A semantic edit of an anchor's non-parameter state (valid files, plausible values)."""
    import torch
    from safetensors.torch import load_file, save_file

    target = ANCHOR_TARGETS[m.b % len(ANCHOR_TARGETS)]
    rel = anchor.relative_to(root).as_posix()
    if target in ("optimizer", "rng"):
        f = anchor / f"{target}.safetensors"
        tensors = load_file(f)
        if tensors:
            name = sorted(tensors)[m.c % len(tensors)]
            t = tensors[name].clone()
            flat = t.view(-1)
            i = (m.b // 3) % max(1, flat.numel())
            if flat.numel() == 0:
                pass
            elif t.is_floating_point():
                how = m.c % 4
                flat[i] = [flat[i] * (1 + 2**-20), flat[i] + 1e-12, torch.zeros(()), flat[i] * 1e6][how]
            else:
                flat[i] = flat[i] ^ 1 if t.dtype == torch.uint8 else flat[i] + 1
            tensors[name] = t
            save_file(tensors, f, metadata={"format": "pt"})
            return f"anchor_state: edit element {i} of {name} in {rel}/{target}"
    meta_path = anchor / "anchor.json"
    meta = json.loads(meta_path.read_text())
    leaves = [p for p in _paths({k: v for k, v in meta.items() if k != "step"}) if not isinstance(_get(meta, p), (dict, list))]
    path = leaves[m.c % len(leaves)]
    old = _get(meta, path)
    if isinstance(old, bool):
        new: Any = not old
    elif isinstance(old, int):
        new = old + (1 if m.b % 2 else -1)
    elif isinstance(old, str) and path[-1] == "float":  # an exact float: nudge its value
        from .digest import decode_float, encode_float

        x = decode_float(old)
        new = encode_float([x * 2, x * (1 + 2**-30), 0.0 if x else 1e-3, -x if x else 1.0][m.b % 4])
    else:
        new = None
    _set(meta, path, new)
    from .digest import canonical_json

    meta_path.write_bytes(canonical_json(meta))
    return f"anchor_state: {'/'.join(map(str, path))} {old!r} -> {new!r} in {rel}/anchor.json"


def fingerprint(root: Path) -> str:
    """A digest of a directory's names and bytes (to skip mutations that changed nothing)."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(p.relative_to(root).as_posix().encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def only_environment_changed(original: Path, mutated: Path) -> bool:
    """True if the only difference in the header is its informational ``environment`` block."""
    try:
        a, b = (json.loads((p / "aftune_trace.json").read_text()) for p in (original, mutated))
    except (OSError, ValueError):
        return False
    return isinstance(a, dict) and isinstance(b, dict) and a != b and \
        {k: v for k, v in a.items() if k != "environment"} == {k: v for k, v in b.items() if k != "environment"}  # fmt: skip


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            out += _paths(v, (*prefix, i))
    return out or [()]


def _get(obj: Any, path: tuple) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def _set(obj: Any, path: tuple, value: Any) -> None:
    if not path:
        return
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value


def reseal(root: Path) -> None:
    """Recompute every commitment a provider controls after a mutation, as a forger would: anchor
    digests and state digests in the records, chain hashes, Merkle root, the card, file digests
    and the trace root. Only the semantic checks and re-execution can still tell. Best effort:
    parts that no longer parse are left as they are."""
    from . import digest as D
    from . import records as R
    from .card import render_card

    try:
        header = json.loads((root / "aftune_trace.json").read_text())
        head = D.chain_start(bytes.fromhex(header["contract_digest"]), header["run_id"])
        entries = []
        for i, line in enumerate((root / "chain.jsonl").read_text().splitlines(), 1):
            record = json.loads(line)["record"]
            _restate(root, record)
            e = R.link(head, i, record)
            entries.append(e)
            head = e.chain
        (root / "chain.jsonl").write_bytes(b"".join(e.line() for e in entries))
        rootfile = json.loads((root / "root.json").read_text())
        steps = [e.record for e in entries if e.record["kind"] != "resume"]
        rootfile.update(chain_head=head.hex(), records_root=D.RECORD_TREE.root_from_hashes([e.leaf for e in entries]).hex(),
                        num_records=len(entries), final_state=steps[-1]["state"],
                        num_steps=max(r["step"] for r in steps))  # fmt: skip
        (root / "README.md").write_text(render_card(header, rootfile), encoding="utf-8")
        rootfile["files"] = {p.relative_to(root).as_posix(): D.file_digest(p).hex()
                             for p in sorted(root.rglob("*")) if p.is_file() and p.name != "root.json"}  # fmt: skip
        rootfile.pop("trace_root", None)
        rootfile["trace_root"] = D.trace_root(rootfile).hex()
        (root / "root.json").write_bytes(D.canonical_json(rootfile))
    except Exception:  # noqa: BLE001 - a forger who cannot reseal leaves the mutation as it is
        return


def _restate(root: Path, record: dict[str, Any]) -> None:
    """Make a record's state and anchor digests those of the (possibly mutated) files it names
    (an FSDP trace's rank files joined, as the reader joins them)."""
    from safetensors.torch import load_file

    from . import digest as D
    from .trace import anchor_files, anchor_path, checkpoint_files, shard_count
    from .trace.reader import merge_shards

    shards = shard_count(json.loads((root / "aftune_trace.json").read_text())["contract"])

    def tensors(files: list[str]) -> dict[str, Any]:
        parts = [load_file(root / f) for f in files]
        return parts[0] if len(parts) == 1 else merge_shards(parts, path=files[0])

    step = record.get("step")
    if record.get("kind") == "step" and record.get("checkpoint"):
        try:
            record["state"] = D.state_digest(tensors(checkpoint_files(step, shards))).hex()
        except Exception:  # noqa: BLE001
            pass
    if record.get("anchor") is None:
        return
    try:
        parts = {p: D.state_digest(tensors(anchor_files(step, p, shards))) for p in ("params", "optimizer", "rng")}
        parts["meta"] = D.json_digest(json.loads((root / anchor_path(step, "meta")).read_text()))
    except Exception:  # noqa: BLE001
        return
    record["anchor"] = D.anchor_digest(parts).hex()
    record["state"] = parts["params"].hex()
