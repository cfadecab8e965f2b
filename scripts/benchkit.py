"""What every benchmark script shares: a base model big enough to time, contracts for it, JSON results.

    from benchkit import bench_model, bench_contract, emit, parser
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

import yaml

from aftune_hf.artifacts import dataset_digest
from aftune_hf.recipes.causal_lm import DEFAULT_DATASET, make_base_model

REPO = Path(__file__).resolve().parents[1]


def parser(doc: str, *, model: bool = True) -> argparse.ArgumentParser:
    """The options every benchmark has: ``--json`` (and the model size: ``--hidden``, ``--layers``)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    if model:
        ap.add_argument("--hidden", type=int, default=512)
        ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--json", help="also write the headline figures here")
    return ap


def bench_model(work: Path, hidden: int = 512, layers: int = 6) -> tuple[Path, str]:
    """A Llama-style base model (default 23.9 M parameters: a step takes >= 0.5 s on 2 CPU cores)."""
    base = work / "base"
    digest = make_base_model(base, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                             num_attention_heads=8, num_key_value_heads=4)  # fmt: skip
    return base, digest


def bench_contract(work: Path, kind: str, base: Path, digest: str, *, steps: int, name: str | None = None,
                   sections: dict[str, dict[str, Any]] | None = None, **audit: Any) -> Path:
    """``configs/<kind>.yaml`` pointed at ``base`` and the bundled dataset, ``steps`` steps, ``audit``
    overrides; ``sections`` patches other sections (``{"training": {"precision": "bf16"}}``). Paths are
    written relative to the contract file, so ``work`` can be moved (e.g. to a GPU machine)."""
    data = yaml.safe_load((REPO / "configs" / f"{kind}.yaml").read_text())
    data["base_model"] = {"path": os.path.relpath(base, work), "digest": digest}
    data["dataset"] = {"path": os.path.relpath(DEFAULT_DATASET, work), "digest": dataset_digest(DEFAULT_DATASET).hex()}
    data["training"]["max_steps"] = steps
    data["audit"].update(audit)
    for section, values in (sections or {}).items():
        data.setdefault(section, {}).update(values)
    path = work / f"{name or kind}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def machine() -> dict[str, Any]:
    """Where a figure was measured."""
    import torch
    import transformers

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "torch_threads": torch.get_num_threads()}  # fmt: skip


def emit(path: str | None, results: dict[str, Any]) -> None:
    """Write a benchmark's headline figures as JSON (for scripts/bench_all.py)."""
    if path:
        Path(path).write_text(json.dumps({**results, "machine": machine()}, indent=2))
