"""Jobs as a new user brings them: a GPT-2 / BERT built from a config with a tokenizer trained here
(no download), datasets as files for ``datasets.load_dataset``, contracts from ``aftune contract init``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import DATASET


def rows() -> list[dict[str, str]]:
    return [json.loads(line) for line in DATASET.read_text(encoding="utf-8").splitlines() if line.strip()]


def texts() -> list[str]:
    return [f"{r['instruction']} {r['response']}" for r in rows()]


def make_gpt2(out: Path, *, n_embd: int = 48, seed: int = 0, **config: Any) -> Path:
    """A tiny GPT-2 with its own byte-level BPE tokenizer (trained on the dataset), saved the HF way;
    ``config`` overrides GPT2Config fields (``n_layer``, ``tie_word_embeddings``)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts(), vocab_size=400, min_frequency=2, special_tokens=["<|endoftext|>"])
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>")  # fmt: skip
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    config = GPT2Config(**{"vocab_size": len(tok), "n_positions": 128, "n_embd": n_embd, "n_layer": 2, "n_head": 4,
                           "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, **config})  # dropout 0.1: on
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_bert_mlm(out: Path, *, seed: int = 0) -> Path:
    """A tiny BERT *masked-LM* checkpoint (the bert-base pattern) with a WordPiece tokenizer trained here."""
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(texts(), vocab_size=300, min_frequency=1)
    vocab = out / "vocab.txt"
    out.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(sorted(wp.get_vocab(), key=wp.get_vocab().get)) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    config = BertConfig(vocab_size=len(tok), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(seed)
    BertForMaskedLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def qa_rows() -> list[dict[str, str]]:
    return [{"question": r["instruction"], "answer": r["response"]} for r in rows()]


def labelled_rows() -> list[dict[str, Any]]:
    return [{"text": r["instruction"], "label": int(any(ch.isdigit() for ch in r["instruction"]))} for r in rows()]


def init(work: Path, model: Path, dataset: Path, *args: str, **settings: Any) -> Path:
    """``aftune contract init`` (the real CLI entry point) with ``--set`` for each setting."""
    from aftune_hf.cli import main

    out = work / "contract.yaml"
    sets = [f"--set={k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in settings.items()]  # fmt: skip
    assert main(["contract", "init", "--model", str(model), "--dataset", str(dataset), *args, *sets, "-o", str(out)]) == 0
    return out


SMALL = {"training.max_steps": 6, "training.per_device_train_batch_size": 4, "training.learning_rate": 1e-3,
         "training.padding.max_length": 64, "audit.anchor_every": 2, "audit.windows": 3}  # fmt: skip


def recipe_without_overrides(contract, output_dir):
    """A recipe that breaks the rule: it does not accept the verifier's overrides."""
    from aftune_hf.recipes.causal_lm import build

    return build(contract, output_dir)
