"""Shared fixtures: a tiny base model built from a config (no network) and contracts for it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DATASET = REPO / "aftune_hf" / "recipes" / "data" / "tiny_instruct.jsonl"


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama base model of configs/*.yaml, created deterministically."""
    from aftune_hf.recipes.causal_lm import make_base_model

    out = tmp_path_factory.mktemp("base") / "tiny-llama"
    make_base_model(out)
    return out


@pytest.fixture(scope="module")
def hub():
    """tests/hub_server.py, a local HTTP server standing in for the Hub: (FakeHub, endpoint URL)."""
    from tests.hub_server import FakeHub

    fake = FakeHub()
    endpoint = fake.start()
    yield fake, endpoint
    fake.stop()


@pytest.fixture
def write_contract(tmp_path, base_model_dir):
    """Write a contract YAML next to the test's tmp dir: ``write_contract("tiny-lora", training={...})``."""

    def _write(template: str = "tiny-lora", name: str = "contract.yaml", **changes) -> Path:
        data = yaml.safe_load((CONFIGS / f"{template}.yaml").read_text())
        data["base_model"]["path"] = str(base_model_dir)
        data["dataset"]["path"] = str(DATASET)
        for section, value in changes.items():
            if isinstance(value, dict) and isinstance(data.get(section), dict):
                data[section] = {**data[section], **value}
            else:
                data[section] = value
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return _write


def record_tiny(work: Path, base_model_dir: Path, *, template: str = "tiny-lora", steps: int, **audit) -> tuple[Path, Path]:
    """Write a contract for the tiny model (``steps`` steps, ``audit`` overrides) into ``work`` and
    record an honest run of it with AuditCallback; returns (contract path, trace directory)."""
    import transformers

    from aftune_hf import AuditCallback
    from aftune_hf.contract import load_contract
    from aftune_hf.recipes.causal_lm import build

    data = yaml.safe_load((CONFIGS / f"{template}.yaml").read_text())
    data["base_model"]["path"], data["dataset"]["path"] = str(base_model_dir), str(DATASET)
    data["training"]["max_steps"] = steps
    data["audit"].update(audit)
    (work / "c.yaml").write_text(yaml.safe_dump(data))
    contract = load_contract(work / "c.yaml")
    parts = build(contract, str(work / "o"), disable_tqdm=True, logging_steps=1000)
    transformers.Trainer(**parts.trainer_kwargs(), callbacks=[AuditCallback(contract, work / "trace")]).train()
    return work / "c.yaml", work / "trace"
