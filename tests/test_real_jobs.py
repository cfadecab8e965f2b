"""Honest real jobs verify: a new user's models, tokenizers, datasets and Trainer settings.

Each job is set up as a user would: a model directory with its own tokenizer, data files read by
``datasets.load_dataset``, a contract written by ``aftune contract init``, the generic recipe and
no recipe code of theirs. No honest job may FAIL; a cheat inside each still must.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from aftune_hf import audited_trainer, verify_trace
from aftune_hf.contract import load_contract
from aftune_hf.errors import ConfigError, ContractViolationError
from aftune_hf.trace import anchor_path
from scripts.attacks.cheats import Cheat
from tests import jobs
from tests.conftest import CONFIGS, DATASET, REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return jobs.make_gpt2(tmp_path_factory.mktemp("gpt2") / "my-gpt2")


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory):
    """Question/answer rows split over two JSON-lines files in one folder."""
    d = tmp_path_factory.mktemp("qa") / "qa"
    r = jobs.qa_rows()
    jobs.write_jsonl(d / "part-0.jsonl", r[:50])
    jobs.write_jsonl(d / "part-1.jsonl", r[50:])
    return d


def record(contract_path, work, *, cheat=None, **overrides):
    trainer = audited_trainer(contract_path, work / "out", work / "trace", callbacks=(cheat,) if cheat else (),
                              disable_tqdm=True, **overrides)  # fmt: skip
    trainer.train()
    return work / "trace", trainer


def _cli(args, **env):
    e = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-m", "aftune_hf", *map(str, args)], capture_output=True, text=True, env=e)


def test_gpt2_own_bpe_tokenizer_load_dataset_generic_recipe(gpt2, qa_data, tmp_path):
    """GPT-2 with a locally trained BPE tokenizer, a folder of JSON-lines files, dropout on (GPT-2's
    0.1), LoRA: `aftune contract init` + the generic recipe, record -> verify PASS, no user recipe code."""
    path = jobs.init(tmp_path, gpt2, qa_data, "--lora", "4", **jobs.SMALL,
                     **{"data.prompt_template": "Q: {question}\nA: "})  # fmt: skip
    c = load_contract(path)
    assert c.data.prompt_column == "question" and c.data.response_column == "answer"  # read off the files
    assert c.peft.target_modules == ("c_attn",) and c.recipe == "aftune_hf.recipes.generic:causal_lm"
    trace, trainer = record(path, tmp_path)
    assert trainer.model.base_model.model.config.attn_pdrop == 0.1
    trainer.model.save_pretrained(tmp_path / "adapter")
    report = verify_trace(trace, path, nonce="5151515151515151", model=tmp_path / "adapter")
    assert report.verdict == "PASS", report.summary()
    assert report.data_check.steps_checked == 6 and len(report.windows) == 3
    cheated, _ = record(path, tmp_path / "cheat", cheat=Cheat("nudge", 3))
    bad = verify_trace(cheated, path, nonce="5151515151515151")
    assert bad.verdict == "FAIL" and bad.failures[0].step == 3, bad.summary()


def test_tokenizer_files_are_bound_by_the_base_model_digest(gpt2, tmp_path):
    import shutil

    from aftune_hf.artifacts import model_dir_digest

    copy = tmp_path / "m"
    shutil.copytree(gpt2, copy)
    before = model_dir_digest(copy)
    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages }}"
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert model_dir_digest(copy) != before


def test_sft_trainer_honest_passes_and_a_cheat_fails(gpt2, tmp_path):
    """trl.SFTTrainer named in the contract: it tokenizes prompt/completion rows (from a parquet file)
    itself and adds inputs in compute_loss; the verifier replays and data-checks through it."""
    pytest.importorskip("trl")
    from datasets import Dataset

    data = tmp_path / "train.parquet"
    Dataset.from_list([{"prompt": r["question"], "completion": r["answer"]} for r in jobs.qa_rows()]).to_parquet(data)
    path = jobs.init(tmp_path, gpt2, data, "--lora", "4", "--trainer", "trl:SFTTrainer", **jobs.SMALL,
                     **{"trainer_args": {"completion_only_loss": True, "gradient_checkpointing": False}})  # fmt: skip
    trace, trainer = record(path, tmp_path / "honest")
    assert type(trainer).__name__ == "SFTTrainer"
    report = verify_trace(trace, path, nonce="5252525252525252")
    assert report.verdict == "PASS", report.summary()
    assert not report.data_check.mismatched_steps
    cheated, _ = record(path, tmp_path / "cheat", cheat=Cheat("lr", 4, amount=0.9))
    bad = verify_trace(cheated, path, nonce="5252525252525252")
    assert bad.verdict == "FAIL" and bad.failures[0].step == 4, bad.summary()


def test_evaluation_logging_saving_during_training_with_dropout_passes(gpt2, qa_data, tmp_path):
    """What a user sets without thinking: evaluation every 2 steps (iterating the eval dataloader
    draws from the global RNG), logging every step with token counts (a trainer-state counter only
    logging fills: it used to FAIL continuity), Trainer checkpoints, report_to, group_by_length
    -- with dropout on and gradient checkpointing. The RNG the training steps consume is the one the
    anchors commit."""
    path = jobs.init(tmp_path, gpt2, qa_data, "--lora", "4", **jobs.SMALL,
                     **{"trainer_args": {"train_sampling_strategy": "group_by_length"}})  # fmt: skip
    c = load_contract(path)
    from aftune_hf.recipes.generic import causal_lm

    held_out = causal_lm(c, str(tmp_path / "eval")).train_dataset.select(range(8))
    trace, trainer = record(path, tmp_path, eval_dataset=held_out, eval_strategy="steps", eval_steps=2, eval_on_start=True,
                            logging_steps=1, save_strategy="steps", save_steps=3, report_to="none",
                            gradient_checkpointing=True, include_num_input_tokens_seen="all")  # fmt: skip
    assert sum("eval_loss" in h for h in trainer.state.log_history) == 4
    report = verify_trace(trace, path, nonce="5353535353535353")
    assert report.verdict == "PASS", report.summary()


def test_a_setting_that_changes_the_computation_must_be_in_the_contract(gpt2, qa_data, tmp_path):
    """Batches grouped by length are other batches: set outside the contract, the recorder refuses."""
    path = jobs.init(tmp_path, gpt2, qa_data, "--lora", "4", **jobs.SMALL)
    with pytest.raises(ContractViolationError, match="train_sampling_strategy: default='random', live='group_by_length'"):
        record(path, tmp_path, train_sampling_strategy="group_by_length", label_smoothing_factor=0.0)
    with pytest.raises(ContractViolationError, match="label_smoothing_factor"):
        record(path, tmp_path / "b", label_smoothing_factor=0.1)


@pytest.fixture(scope="module")
def llama48(tmp_path_factory):
    """The demo's Llama with hidden size 48: 1/sqrt(48) is not a power of two, so LoRA's
    kaiming_uniform_ initialisation differs in its last bits between CPU kernel paths."""
    from aftune_hf.recipes.causal_lm import make_base_model

    work = tmp_path_factory.mktemp("llama48")
    digest = make_base_model(work / "base", hidden_size=48, intermediate_size=96)
    data = yaml.safe_load((CONFIGS / "tiny-lora.yaml").read_text())
    data["base_model"] = {"path": str(work / "base"), "digest": digest}
    data["dataset"]["path"] = str(DATASET)
    data["training"]["max_steps"] = 6
    data["audit"].update(anchor_every=2, windows=3, mode="tolerance", tolerance=1e-6)
    (work / "tol.yaml").write_text(yaml.safe_dump(data))
    trace, _ = record(work / "tol.yaml", work / "honest")
    return work / "tol.yaml", trace, work


def test_tolerance_mode_across_cpu_kernels_with_a_fresh_lora_init(llama48, tmp_path):
    contract, trace, work = llama48
    env = {"ATEN_CPU_CAPABILITY": "default"}
    p = _cli(["verify", trace, "--contract", contract, "--nonce", "5454545454545454", "--json"], **env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    cal = _cli(["calibrate", trace, "--contract", contract, "--json"], **env)
    assert cal.returncode == 0, cal.stderr[-2000:]
    measured = json.loads(cal.stdout)
    assert 0 < measured["initial"] < 1e-6 and not measured["problems"]  # the init really differed, and is measured
    cheated, _ = record(contract, tmp_path / "cheat", cheat=Cheat("lr", 3, amount=0.9))
    bad = _cli(["verify", cheated, "--contract", contract, "--nonce", "5454545454545454", "--json"], **env)
    assert bad.returncode == 1, bad.stdout[-3000:] + bad.stderr[-2000:]
    assert json.loads(bad.stdout)["failures"][0]["step"] == 3


@pytest.mark.parametrize("edit", ["scale_a", "nonzero_b"])
def test_tolerance_mode_initial_state_further_than_tolerance_fails(llama48, tmp_path, edit):
    """The freedom tolerance mode leaves at step 0 is the tolerance: a resealed step-0 adapter
    1e-4 away, or a LoRA B that is not zero, FAILs initial_state."""
    import shutil

    from safetensors.torch import load_file, save_file

    from aftune_hf.fuzz import reseal

    contract, trace, _ = llama48
    copy = tmp_path / "trace"
    shutil.copytree(trace, copy)
    f = copy / anchor_path(0, "params")
    tensors = load_file(f)
    name = sorted(n for n in tensors if ("lora_A" if edit == "scale_a" else "lora_B") in n)[0]
    tensors[name] = tensors[name] * (1 + 1e-4) if edit == "scale_a" else tensors[name] + 1e-9
    save_file(tensors, f, metadata={"format": "pt"})
    reseal(copy)
    report = verify_trace(copy, contract, nonce="5454545454545454")
    assert report.verdict == "FAIL" and report.failures[0].code == "initial_state", report.summary()


def test_exact_mode_adopts_the_recorders_thread_count(write_contract, tmp_path):
    """An exact trace recorded with 1 torch thread verifies on a 2-thread verifier: the header says 1
    and the verifier replays with 1. (On this 2-vCPU VM 1 and 2 threads happen to give the same bits
    even at hidden size 768, so the PASS alone would not show it; the adoption is asserted.)"""
    path = write_contract(training={"max_steps": 4}, audit={"anchor_every": 2, "windows": 2})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trace, _ = record(path, tmp_path)
    finally:
        torch.set_num_threads(threads)
    header = json.loads((trace / "aftune_trace.json").read_text())
    assert header["environment"]["threads"] == "1" and "cpu_capability" in header["environment"]
    torch.set_num_threads(2)
    said: list[str] = []
    try:
        report = verify_trace(trace, path, nonce="5555555555555555", log=said.append)
        assert torch.get_num_threads() == 2  # the verifier's own setting is given back
        assert "using 1 torch threads, as the recorder did (exact mode)" in said
    finally:
        torch.set_num_threads(threads)
    assert report.verdict == "PASS", report.summary()


def test_delivered_adapter_loaded_the_hf_way_passes_verify_inference(write_contract, tmp_path, base_model_dir):
    """The provider saves the final adapter, serves PeftModel.from_pretrained(AutoModel..., adapter)
    (the base config has no training dropout; the recipe's had 0.1) and commits the calls."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from aftune_hf import wrap_generate
    from aftune_hf.recipes.tokenizer import byte_tokenizer
    from aftune_hf.trace import TraceReader
    from aftune_hf.verify_inference import verify_inference

    path = write_contract(training={"max_steps": 4}, audit={"anchor_every": 2, "windows": 2, "inference_calls": 2})
    trace, trainer = record(path, tmp_path)
    trainer.model.save_pretrained(tmp_path / "adapter")  # what the provider delivers
    served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_dir), tmp_path / "adapter").eval()
    wrap_generate(served, tmp_path / "log")
    tok = byte_tokenizer(padding_side="left")
    enc = tok(["### Instruction:\nHello\n### Response:\n", "Say hi."], return_tensors="pt", padding=True)
    served.generate(**enc, max_new_tokens=8, do_sample=False)
    served.aftune_log.publish()
    report = verify_inference(tmp_path / "log", path, trace=trace, nonce="5656565656565656")
    assert report.verdict == "PASS", report.summary()
    assert verify_trace(trace, path, nonce="5656565656565656", model=tmp_path / "adapter").verdict == "PASS"
    assert TraceReader(trace).check_integrity().num_steps == 4


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    model = jobs.make_bert_mlm(d / "tiny-bert-mlm")
    from datasets import Dataset

    data = jobs.write_jsonl(d / "labelled.jsonl", jobs.labelled_rows())
    named = d / "labelled.csv"  # string labels, numbered in sorted order
    Dataset.from_list([{"text": r["text"], "label": ["plain", "has-digit"][r["label"]]} for r in jobs.labelled_rows()]).to_csv(named)
    return model, data, named


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-modules_to_save"])
def test_bert_classification_from_an_mlm_checkpoint(bert, tmp_path, lora):
    """bert-base pattern: a masked-LM checkpoint (cls.predictions.* unused) under a new classifier
    head, dropout on; full fine-tune (JSON lines, integer labels), and LoRA with the head trained
    fully (modules_to_save; a CSV file with string labels)."""
    model, data, named = bert
    data = named if lora else data  # LoRA: a CSV with string labels
    extra = ["--lora", "4", "--set=peft.modules_to_save=[classifier]"] if lora else []
    path = jobs.init(tmp_path, model, data, "--task", "sequence_classification", *extra, **jobs.SMALL)
    c = load_contract(path)
    assert c.data.num_labels == 2 and c.data.text_column == "text"
    trace, trainer = record(path, tmp_path)
    names = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in names) and (not lora or any("lora_" in n for n in names))
    trainer.model.save_pretrained(tmp_path / "delivered")  # the head and (LoRA) the adapter, the HF way
    report = verify_trace(trace, path, nonce="5757575757575757", model=tmp_path / "delivered")
    assert report.verdict == "PASS", report.summary()
    cheated, _ = record(path, tmp_path / "cheat", cheat=Cheat("nudge", 5))
    assert verify_trace(cheated, path, nonce="5757575757575757").verdict == "FAIL"


def test_recipe_source_is_bound_by_recipe_digest(write_contract, tmp_path):
    from aftune_hf.scaffold import digest_path

    right = digest_path("aftune_hf.recipes.causal_lm:build")
    assert right == digest_path(str(REPO / "aftune_hf" / "recipes" / "causal_lm.py"))
    good = write_contract(recipe_digest=right, training={"max_steps": 2}, audit={"anchor_every": 1, "windows": 2})
    trace, _ = record(good, tmp_path / "good")
    assert verify_trace(trace, good, nonce="5858585858585858").verdict == "PASS"
    wrong = write_contract(name="wrong.yaml", recipe_digest="0" * 64, training={"max_steps": 2})
    with pytest.raises(ConfigError, match="recipe_mismatch"):
        record(wrong, tmp_path / "bad")
    report = verify_trace(trace, wrong, nonce="5858585858585858")
    assert report.verdict == "ERROR" and "recipe_mismatch" in report.error  # the client's recipe is not its contract's


def test_dora_adapter_passes(write_contract, tmp_path):
    path = write_contract(peft={"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"],
                                "use_dora": True}, training={"max_steps": 4}, audit={"anchor_every": 2, "windows": 2})  # fmt: skip
    trace, trainer = record(path, tmp_path)
    assert any("lora_magnitude_vector" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    assert verify_trace(trace, path, nonce="5959595959595959").verdict == "PASS"


def test_digest_cli_prints_what_the_contract_binds(gpt2, qa_data):
    from aftune_hf.artifacts import dataset_digest, model_dir_digest

    model = _cli(["digest", gpt2])
    data = _cli(["digest", qa_data])
    recipe = _cli(["digest", "aftune_hf.recipes.generic:causal_lm"])
    assert model.stdout.strip() == model_dir_digest(gpt2).hex() and data.stdout.strip() == dataset_digest(qa_data).hex()
    assert len(recipe.stdout.strip()) == 64 and recipe.returncode == 0
    missing = _cli(["digest", "no/such/path"])
    assert missing.returncode == 2 and "no such file" in missing.stderr


@pytest.mark.parametrize("fmt", ["text", "messages"])
@pytest.mark.parametrize("trainer", ["transformers:Trainer", "trl:SFTTrainer"])
def test_plain_text_and_chat_datasets_full_fine_tune(gpt2, tmp_path, fmt, trainer):
    """A .txt file (builder text) and chat messages rendered with the tokenizer's chat template,
    full fine-tune, with either trainer; `contract init` recognises the columns."""
    if fmt == "text":
        data = tmp_path / "corpus.txt"
        data.write_text("\n".join(jobs.texts()) + "\n")
    else:
        data = jobs.write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": r["question"]},
                                                                        {"role": "assistant", "content": r["answer"]}]}
                                                          for r in jobs.qa_rows()])  # fmt: skip
    path = jobs.init(tmp_path, gpt2, data, "--trainer", trainer, **jobs.SMALL)
    c = load_contract(path)
    assert (c.data.text_column, c.data.messages_column) == (("text", None) if fmt == "text" else (None, "messages"))
    trace, _ = record(path, tmp_path)
    report = verify_trace(trace, path, nonce="5a5a5a5a5a5a5a5a")
    assert report.verdict == "PASS", report.summary()


def test_a_recipe_that_drops_overrides_gets_a_clear_error(write_contract, tmp_path):
    from aftune_hf.contract import load_recipe

    c = load_contract(write_contract(recipe="tests.jobs:recipe_without_overrides"))
    with pytest.raises(ConfigError, match=r"recipe_signature: tests.jobs:recipe_without_overrides must accept and forward \*\*overrides"):
        load_recipe(c)(c, str(tmp_path), save_strategy="no")


@pytest.mark.parametrize("steps", [7, 100, 1000])
def test_contract_init_sizes_the_audit_for_its_detection_target(gpt2, qa_data, tmp_path, steps):
    """Left to its defaults, `contract init` picks anchors and windows whose verification reaches the
    contract's min_detection: an honest job is never INCONCLUSIVE by construction."""
    import math

    from aftune_hf.report import Detection

    c = load_contract(jobs.init(tmp_path, gpt2, qa_data, **{"training.max_steps": steps}))
    a = c.audit
    n = math.ceil(steps / a.anchor_every)
    assert Detection.compute(n, min(a.windows, n), a.detect_fraction, a.min_detection).achieved >= a.min_detection
    assert a.windows < n or n <= 2 or steps < 50  # and not everything re-executed on a long run


def test_scheduler_options_in_trainer_args(write_contract, tmp_path):
    """cosine_with_min_lr needs lr_scheduler_kwargs (a mapping in trainer_args); the schedule the
    verifier derives is that one, and a run with other options is refused."""
    path = write_contract(training={"max_steps": 4, "lr_scheduler_type": "cosine_with_min_lr"},
                          trainer_args={"lr_scheduler_kwargs": {"min_lr_rate": 0.5}}, audit={"anchor_every": 2, "windows": 2})  # fmt: skip
    trace, trainer = record(path, tmp_path)
    lrs = [float(h["learning_rate"]) for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs[-1] == pytest.approx(0.75e-3)  # halfway down the cosine to the floor 0.5 x lr (plain cosine: 0.5e-3)
    assert verify_trace(trace, path, nonce="5b5b5b5b5b5b5b5b").verdict == "PASS"
    other = write_contract(name="other.yaml", training={"max_steps": 4, "lr_scheduler_type": "cosine_with_min_lr"},
                           trainer_args={"lr_scheduler_kwargs": {"min_lr_rate": 0.1}})  # fmt: skip
    with pytest.raises(ContractViolationError, match="lr_scheduler_kwargs"):
        from aftune_hf import AuditCallback
        from aftune_hf.contract import load_recipe
        from aftune_hf.recipes.common import trainer_class

        c, o = load_contract(path), load_contract(other)
        parts = load_recipe(c)(c, str(tmp_path / "x"), disable_tqdm=True)  # the run is path's, the contract other's
        trainer_class(c)(**parts.trainer_kwargs(), callbacks=[AuditCallback(o, tmp_path / "t2")]).train()
