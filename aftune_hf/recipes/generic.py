"""Generic built-in recipes, configured by the contract alone: no recipe code to write.

* ``aftune_hf.recipes.generic:causal_lm`` -- any ``AutoModelForCausalLM`` directory with its
  own ``AutoTokenizer`` (its files and chat template are covered by ``base_model.digest``);
* ``aftune_hf.recipes.generic:sequence_classification`` -- ``AutoModelForSequenceClassification``
  with ``data.num_labels`` labels (integers, or strings numbered in sorted order), from a
  checkpoint whose head is new (an MLM-pretrained one);

full fine-tuning or the contract's ``peft`` (LoRA, DoRA, ``modules_to_save``). The dataset is
read with ``datasets.load_dataset`` as the contract's ``data`` section says
(:class:`~aftune_hf.contract.Data`). With ``trainer: trl:SFTTrainer`` the causal-LM recipe hands
SFTTrainer the rows in its own formats (``prompt``/``completion``, ``messages``, ``text``) and
SFTTrainer tokenizes them as configured in ``trainer_args``; with the plain Trainer it tokenizes
them itself (prompt masked out of the loss when ``data.mask_prompt``). ``recipe_args`` may set
model config fields as ``config.<name>`` (e.g. ``config.attention_dropout: 0.1``).

Example (contract excerpt)::

    recipe: aftune_hf.recipes.generic:causal_lm
    base_model: {path: models/my-gpt2, digest: ...}     # aftune digest models/my-gpt2
    dataset: {path: data/train.jsonl, digest: ...}
    data: {builder: json, prompt_column: question, response_column: answer,
           prompt_template: "Q: {question}\\nA: "}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..contract import Contract, Data, Recipe
from ..errors import ConfigError
from .common import apply_peft, trainer_class, training_arguments


def causal_lm(contract: Contract, output_dir: str, **overrides: Any) -> Recipe:
    """Causal-LM fine-tuning of the contract's model on its dataset (see the module docstring)."""
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

    spec, t = contract.data or Data(), contract.training
    sft = _is_sft(contract)  # SFTTrainer pads and truncates itself: to the contract's padding (contract_fields)
    args = training_arguments(contract, output_dir, **overrides)
    tokenizer = load_tokenizer(contract)
    model = _model(AutoModelForCausalLM, contract, tokenizer)
    model = apply_peft(model, contract, "CAUSAL_LM")
    rows = load_rows(contract, output_dir)
    if sft:
        return Recipe(model, args, _sft_rows(rows, spec, tokenizer), None, tokenizer)
    dataset = rows.map(lambda row: _tokenize_lm(row, spec, tokenizer, t.padding.max_length), remove_columns=rows.column_names)
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", pad_to_multiple_of=t.padding.pad_to_multiple_of,
                                      return_tensors="pt")  # fmt: skip
    return Recipe(model, args, dataset, collator, tokenizer)


def sequence_classification(contract: Contract, output_dir: str, **overrides: Any) -> Recipe:
    """Sequence classification with ``data.num_labels`` labels (see the module docstring)."""
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

    spec, t = contract.data or Data(), contract.training
    if spec.num_labels is None or spec.num_labels < 1 or spec.text_column is None:
        raise ConfigError("invalid_data", "sequence classification needs data.num_labels and data.text_column")
    args = training_arguments(contract, output_dir, **overrides)
    tokenizer = load_tokenizer(contract)
    model = _model(AutoModelForSequenceClassification, contract, tokenizer, num_labels=spec.num_labels)
    model = apply_peft(model, contract, "SEQ_CLS")
    rows = load_rows(contract, output_dir)
    for col in (spec.text_column, spec.text_pair_column, spec.label_column):
        if col is not None and col not in rows.column_names:
            raise ConfigError("dataset_invalid", f"no column {col!r} (columns: {rows.column_names})")

    names = sorted(set(rows[spec.label_column])) if all(isinstance(v, str) for v in rows[spec.label_column]) else None

    def tokenize(row: dict[str, Any]) -> dict[str, Any]:
        pair = row[spec.text_pair_column] if spec.text_pair_column else None
        out = tokenizer(row[spec.text_column], pair, truncation=True, max_length=t.padding.max_length)
        label = row[spec.label_column] if names is None else names.index(row[spec.label_column])  # names: sorted
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < spec.num_labels:
            raise ConfigError("dataset_invalid", f"label {label!r} is not an integer in [0, {spec.num_labels})")
        return {**out, "labels": label}

    dataset = rows.map(tokenize, remove_columns=rows.column_names)
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=t.padding.pad_to_multiple_of, return_tensors="pt")
    return Recipe(model, args, dataset, collator, tokenizer)


# --- parts ---------------------------------------------------------------------------------------


def load_tokenizer(contract: Contract) -> Any:
    """The base model directory's own tokenizer; a tokenizer with no pad token pads with its EOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(contract.resolve(contract.base_model.path),
                                        padding_side=contract.training.padding.side)  # fmt: skip
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError("tokenizer_invalid", "the tokenizer has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def load_rows(contract: Contract, output_dir: str) -> Any:
    """``datasets.load_dataset`` of ``dataset.path`` as ``contract.data`` says (cached under ``output_dir``)."""
    from datasets import load_dataset

    spec = contract.data or Data()
    root = contract.resolve(contract.dataset.path)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        patterns = spec.files or ("**/*",)
        files = sorted({p for pat in patterns for p in root.glob(pat) if p.is_file() and not p.name.startswith(".")})
    else:
        raise ConfigError("dataset_not_found", "no such file or directory", path=str(root))
    if not files:
        raise ConfigError("dataset_not_found", f"no files match {list(spec.files)}", path=str(root))
    builder = "json" if spec.builder == "jsonl" else spec.builder
    try:
        return load_dataset(builder, data_files=[str(f) for f in files], split=spec.split,
                            cache_dir=str(Path(output_dir) / ".datasets-cache"))  # fmt: skip
    except (ValueError, KeyError) as e:
        raise ConfigError("dataset_invalid", f"load_dataset({builder!r}): {e}", path=str(root)) from None


def _model(auto: Any, contract: Contract, tokenizer: Any, **kwargs: Any) -> Any:
    import torch
    from transformers import AutoConfig, set_seed

    base = contract.resolve(contract.base_model.path)
    config = AutoConfig.from_pretrained(base, **kwargs)
    for key, value in contract.recipe_args.items():
        name = key.removeprefix("config.")
        if not key.startswith("config.") or not hasattr(config, name):
            raise ConfigError("invalid_recipe_args", f"recipe_args.{key}: expected config.<a field of {type(config).__name__}>")
        setattr(config, name, value)
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    set_seed(contract.training.seed)  # new weights (a head, an adapter) are drawn from the global RNG
    return auto.from_pretrained(base, config=config, dtype=torch.float32,  # fp32 master weights; bf16/fp16 is autocast
                                attn_implementation=contract.training.attn_implementation)  # fmt: skip


def _is_sft(contract: Contract) -> bool:
    try:
        from trl import SFTTrainer
    except ImportError:
        return False
    return issubclass(trainer_class(contract), SFTTrainer)


def _prompt(row: dict[str, Any], spec: Data, tokenizer: Any) -> str:
    text = spec.prompt_template.format(**row) if spec.prompt_template else str(row[spec.prompt_column])
    if spec.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return text


def _tokenize_lm(row: dict[str, Any], spec: Data, tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """Token ids and labels of one row: the prompt masked out of the loss when ``mask_prompt``."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if spec.text_column is not None:
        ids = tokenizer(str(row[spec.text_column]))["input_ids"] + eos
        prompt_len = 0
    elif spec.messages_column is not None:
        messages = row[spec.messages_column]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        head = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        if not full.startswith(head):
            raise ConfigError("dataset_invalid", "the chat template does not render the last message after the others")
        prompt = tokenizer(head, add_special_tokens=False)["input_ids"]
        ids = prompt + tokenizer(full[len(head):], add_special_tokens=False)["input_ids"]
        prompt_len = len(prompt)
    elif spec.prompt_column is not None or spec.prompt_template is not None:
        if spec.response_column is None:
            raise ConfigError("invalid_data", "a prompt needs data.response_column")
        prompt = tokenizer(_prompt(row, spec, tokenizer), add_special_tokens=not spec.chat_template)["input_ids"]
        ids = prompt + tokenizer(str(row[spec.response_column]), add_special_tokens=False)["input_ids"] + eos
        prompt_len = len(prompt)
    else:
        raise ConfigError("invalid_data", "set data.text_column, data.messages_column or data.prompt_column")
    ids = ids[:max_length]
    labels = [-100 if spec.mask_prompt and i < prompt_len else t for i, t in enumerate(ids)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def _sft_rows(rows: Any, spec: Data, tokenizer: Any) -> Any:
    """The rows in one of SFTTrainer's dataset formats."""
    if spec.text_column is not None:
        return rows.map(lambda r: {"text": str(r[spec.text_column])}, remove_columns=rows.column_names)
    if spec.messages_column is not None:
        return rows.map(lambda r: {"messages": r[spec.messages_column]}, remove_columns=rows.column_names)
    if spec.response_column is None:
        raise ConfigError("invalid_data", "set data.text_column, data.messages_column or data.prompt_column + response_column")
    return rows.map(lambda r: {"prompt": _prompt(r, spec, tokenizer), "completion": str(r[spec.response_column])},
                    remove_columns=rows.column_names)  # fmt: skip
