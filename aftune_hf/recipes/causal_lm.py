"""Built-in recipe: causal-LM fine-tuning (full or LoRA) of a Llama-style model.

The contract's ``base_model.path`` is a Hugging Face model directory (``config.json`` +
``model.safetensors``), ``dataset.path`` a JSON-lines file of
``{"instruction": ..., "response": ...}`` rows. Prompts are masked out of the loss. The
tokenizer is :func:`~aftune_hf.recipes.tokenizer.byte_tokenizer` (no download).
``recipe_args`` may set ``dropout`` (attention dropout of the model).

Example:
    >>> from aftune_hf.contract import load_contract
    >>> from aftune_hf.recipes.causal_lm import build
    >>> parts = build(load_contract("configs/tiny-lora.yaml"), "runs/x")   # doctest: +SKIP
    >>> trainer = transformers.Trainer(**parts.trainer_kwargs())             # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..artifacts import model_dir_digest
from ..contract import Contract, Recipe
from ..errors import ConfigError
from .common import apply_peft, check_recipe_args, training_arguments
from .tokenizer import VOCAB_SIZE, byte_tokenizer

PROMPT = "### Instruction:\n{instruction}\n### Response:\n"
DEFAULT_DATASET = Path(__file__).parent / "data" / "tiny_instruct.jsonl"
TINY_LLAMA: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE + 5,  # 264: a multiple of 8
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "pad_token_id": 256,
    "bos_token_id": 257,
    "eos_token_id": 258,
}
_RECIPE_ARGS = {"dropout"}


def make_base_model(out_dir: str | Path, *, seed: int = 0, **overrides: Any) -> str:
    """Create a Llama-style base model deterministically; return its digest (hex).

    Weights are drawn from one seeded CPU generator in sorted-name order (norms are ones),
    so the digest depends only on the config, the seed and torch's CPU generator.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**TINY_LLAMA, **overrides})
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    out = Path(out_dir)
    model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return model_dir_digest(out).hex()


def load_rows(path: str | Path) -> list[dict[str, str]]:
    """Read the JSON-lines instruction dataset."""
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or set(row) != {"instruction", "response"}:
            raise ConfigError("dataset_invalid", f"line {i + 1}: need instruction and response")
        rows.append(row)
    return rows


def build(contract: Contract, output_dir: str, **training_overrides: Any) -> Recipe:
    """Build model, ``TrainingArguments``, dataset and collator from ``contract``.

    ``training_overrides`` may set arguments the contract does not fix (logging, saving,
    ``report_to``...); setting a contract field raises :class:`ConfigError`.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, set_seed

    t = contract.training
    check_recipe_args(contract, _RECIPE_ARGS)
    args = training_arguments(contract, output_dir, **training_overrides)
    set_seed(t.seed)  # adapter initialisation must be the same for provider and verifier
    tokenizer = byte_tokenizer(padding_side=t.padding.side)
    model = AutoModelForCausalLM.from_pretrained(  # fp32 master weights; bf16/fp16 is autocast
        contract.resolve(contract.base_model.path),
        dtype=torch.float32,
        attn_implementation=t.attn_implementation,
        attention_dropout=float(contract.recipe_args.get("dropout", 0.0)),
    )
    model = apply_peft(model, contract, "CAUSAL_LM")

    def tokenize(row: dict[str, str]) -> dict[str, list[int]]:
        prompt = tokenizer(PROMPT.format(instruction=row["instruction"]))["input_ids"]
        answer = tokenizer(row["response"])["input_ids"] + [tokenizer.eos_token_id]
        ids = ([tokenizer.bos_token_id] + prompt + answer)[: t.padding.max_length]
        labels = ([-100] * (1 + len(prompt)) + answer)[: t.padding.max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    rows = load_rows(contract.resolve(contract.dataset.path))
    dataset = Dataset.from_list(rows).map(tokenize, remove_columns=["instruction", "response"])
    collator = DataCollatorForSeq2Seq(
        tokenizer, padding="longest", pad_to_multiple_of=t.padding.pad_to_multiple_of, return_tensors="pt"
    )
    return Recipe(model, args, dataset, collator, tokenizer)
