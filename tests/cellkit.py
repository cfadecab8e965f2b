"""Cell jobs for the tests: a tiny Llama full fine-tune (dropout on, GA 2, clipping) recorded with layer blocks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.conftest import CONFIGS, DATASET


def base(out: Path, layers: int = 3, **config: Any) -> tuple[Path, str]:
    """A tiny Llama base with ``layers`` decoder layers (``config``: other LlamaConfig fields): (its directory, its digest)."""
    from aftune_hf.recipes.causal_lm import make_base_model

    if not (out / "config.json").is_file():
        make_base_model(out, num_hidden_layers=layers, **config)
    from aftune_hf.artifacts import model_dir_digest

    return out, model_dir_digest(out).hex()


def contract(work: Path, model: tuple[Path, str], blocks: list[int] | None, *, steps: int = 4,
             training: dict[str, Any] | None = None, **audit: Any) -> Path:  # fmt: skip
    data = yaml.safe_load((CONFIGS / "tiny-full.yaml").read_text())
    data["base_model"] = {"path": str(model[0]), "digest": model[1]}
    data["dataset"]["path"] = str(DATASET)
    data["training"].update({"max_steps": steps, **(training or {})})
    data["audit"].update({"anchor_every": 2, "checkpoint_every": 1, "layer_blocks": blocks, **audit})
    work.mkdir(parents=True, exist_ok=True)
    (work / "c.yaml").write_text(yaml.safe_dump(data))
    return work / "c.yaml"


def record(path: Path, trace: Path, *, callbacks: tuple = (), prepare: Any = None) -> Path:
    """Record a run of contract ``path`` into ``trace``: honest unless ``callbacks`` (run before the
    recorder's) or ``prepare(model)`` (called before training) cheat."""
    import transformers

    from aftune_hf import AuditCallback
    from aftune_hf.contract import load_contract
    from aftune_hf.recipes.causal_lm import build

    c = load_contract(path)
    parts = build(c, str(trace.parent / "out"), disable_tqdm=True, logging_steps=1000)
    if prepare is not None:
        prepare(parts.model)
    transformers.Trainer(**parts.trainer_kwargs(), callbacks=[*callbacks, AuditCallback(c, trace)]).train()
    return trace
