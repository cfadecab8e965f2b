"""Digests of the artifacts a contract names: the base model directory and the dataset.

A base model digest hashes tensors, not files (safetensors bytes are not canonical once a
file carries two metadata keys): ``model_digest(state_digest(all tensors in *.safetensors),
config.json without volatile keys)``. A dataset digest is the file digest of a single file,
or the files digest over every file of a directory.

Example:
    >>> from aftune_hf.artifacts import dataset_digest
    >>> dataset_digest("aftune_hf/recipes/data/tiny_instruct.jsonl").hex()[:8]   # doctest: +SKIP
    '...'
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Callable
from typing import Any

from . import digest as D
from .contract import Artifact, Contract
from .errors import ConfigError, ContractViolationError

# config.json keys that record the writer's environment, not the architecture
VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "_name_or_path"})
# config keys that only matter in training mode (dropout; ``problem_type`` picks the loss and is set
# by a classifier's first training forward) or are runtime switches: an eval-mode forward pass
# computes the same outputs whatever they say
TRAINING_ONLY_CONFIG_KEYS = frozenset({
    "attention_dropout", "hidden_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout",
    "classifier_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "activation_dropout", "summary_first_dropout",
    "lora_dropout", "use_cache", "ffn_dropout", "problem_type", "embedding_dropout", "seq_classif_dropout"})  # fmt: skip


def architecture_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` without volatile keys, floats made exact, ready for canonical JSON."""
    return D.exact_floats({k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS})


# files beside the weights that change what the model computes or how its inputs are made
COMPANION_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json")  # fmt: skip


def model_dir_digest(path: str | Path, visit: Callable[[str, Any], None] | None = None) -> bytes:
    """Digest of a Hugging Face model directory: its tensors (``*.safetensors``), ``config.json``
    and the tokenizer / chat template / generation files there (:data:`COMPANION_FILES`).

    Tensors are read and hashed one at a time (memory: the largest tensor, not the model);
    ``visit(name, tensor)`` sees each one on the way (the recorder compares the live model)."""
    from safetensors import safe_open

    root = Path(path)
    files = sorted(root.glob("*.safetensors"))
    if not (root / "config.json").is_file() or not files:
        raise ConfigError("model_not_found", "needs config.json and *.safetensors", path=str(root))
    digests: dict[str, bytes] = {}
    for f in files:
        with safe_open(f, "pt") as fh:
            for name in fh.keys():
                if name in digests:
                    raise ConfigError("model_invalid", f"tensor {name} in two shards", path=str(root))
                tensor = fh.get_tensor(name)
                digests[name] = D.tensor_digest(tensor)
                if visit is not None:
                    visit(name, tensor)
    config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    companions = {n: D.file_digest(root / n) for n in COMPANION_FILES if (root / n).is_file()}
    state = D.named_digest(digests, D.STATE_TREE)  # = state_digest of all tensors, streamed
    return D.model_digest(state, architecture_config(config), D.files_digest(companions))


def dataset_digest(path: str | Path) -> bytes:
    """Digest of a dataset file, or of every file under a dataset directory."""
    root = Path(path)
    if root.is_file():
        return D.file_digest(root)
    if root.is_dir():
        files = {
            p.relative_to(root).as_posix(): D.file_digest(p)
            for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()
        }
        return D.files_digest(files)
    raise ConfigError("dataset_not_found", "no such file or directory", path=str(root))


def check_artifacts(contract: Contract) -> None:
    """Check that the local base model and dataset hash to the contract's digests.

    Raises:
        ContractViolationError: ``base_model_digest`` or ``dataset_digest`` mismatch.
    """
    _check(contract, contract.base_model, model_dir_digest, "base_model_digest")
    _check(contract, contract.dataset, dataset_digest, "dataset_digest")


def _check(contract: Contract, art: Artifact, fn: Any, code: str) -> None:
    path = contract.resolve(art.path)
    actual = fn(path).hex()
    if actual != art.digest:
        raise ContractViolationError(code, f"contract says {art.digest}, local is {actual}", path=str(path))
