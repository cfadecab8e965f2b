"""Contract loading, validation and canonical digest; the shipped configs and recipe."""

from __future__ import annotations

import pytest
import yaml

from aftune_hf.artifacts import check_artifacts, dataset_digest, model_dir_digest
from aftune_hf.contract import Contract, load_contract
from aftune_hf.errors import ConfigError, ContractViolationError
from tests.conftest import CONFIGS, DATASET


def test_shipped_configs_load_and_digest_differs():
    lora, full = load_contract(CONFIGS / "tiny-lora.yaml"), load_contract(CONFIGS / "tiny-full.yaml")
    assert lora.peft is not None and lora.peft.r == 4 and lora.training.learning_rate == 1e-3
    assert full.peft is None and full.audit.checkpoint_every == 2
    assert lora.digest() != full.digest()
    assert lora.resolve(lora.dataset.path).resolve() == DATASET


def test_shipped_config_digests_match_the_artifacts(base_model_dir):
    """The base-model script is deterministic: the configs' digests are reproducible anywhere."""
    cfg = load_contract(CONFIGS / "tiny-lora.yaml")
    assert model_dir_digest(base_model_dir).hex() == cfg.base_model.digest
    assert dataset_digest(DATASET).hex() == cfg.dataset.digest


def test_same_contract_other_spelling_same_digest(tmp_path):
    base = yaml.safe_load((CONFIGS / "tiny-lora.yaml").read_text())
    a = Contract.from_dict(base)
    respelled = dict(reversed(list(base.items())))  # other key order
    respelled["training"] = {**dict(reversed(list(base["training"].items()))), "learning_rate": "0.001"}
    respelled["base_model"] = {**base["base_model"], "path": "/somewhere/else"}  # local paths are not bound
    flow = tmp_path / "flow.yaml"
    flow.write_text(yaml.safe_dump(respelled, default_flow_style=True))
    assert load_contract(flow).digest() == a.digest()
    changed = {**base, "training": {**base["training"], "learning_rate": 1.1e-3}}
    assert Contract.from_dict(changed).digest() != a.digest()


@pytest.mark.parametrize(
    "mutate,code",
    [
        (lambda d: d.update(surprise=1), "unknown_key"),
        (lambda d: d["training"].update(lr=1), "unknown_key"),
        (lambda d: d["audit"].update(mode="lenient"), "invalid_value"),
        (lambda d: d["training"].update(max_steps="12"), "invalid_value"),
        (lambda d: d["training"].update(max_steps=0), "invalid_value"),
        (lambda d: d["training"].update(learning_rate="fast"), "invalid_value"),
        (lambda d: d["training"].pop("max_steps"), "missing_key"),
        (lambda d: d["base_model"].update(digest="abc"), "invalid_digest"),
        (lambda d: d.update(recipe="no_colon"), "invalid_recipe"),
        (lambda d: d.update(aftune_contract=2), "contract_version"),
        (lambda d: d["peft"].update(target_modules=[]), "invalid_value"),
        (lambda d: d["audit"].update(mode="tolerance", checkpoint_every=2), "invalid_audit"),
        (lambda d: d["training"].update(optim="adamw_8bit"), "invalid_value"),
    ],
)
def test_invalid_contracts_are_refused(mutate, code):
    data = yaml.safe_load((CONFIGS / "tiny-lora.yaml").read_text())
    mutate(data)
    with pytest.raises(ConfigError) as e:
        Contract.from_dict(data)
    assert e.value.code == code


def test_unknown_key_error_names_the_key():
    data = yaml.safe_load((CONFIGS / "tiny-lora.yaml").read_text())
    data["training"]["learning_rte"] = 1
    with pytest.raises(ConfigError, match="training.learning_rte"):
        Contract.from_dict(data)


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="contract_unreadable"):
        load_contract(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="contract_invalid_yaml"):
        load_contract(bad)


def test_artifact_mismatch_is_a_contract_violation(write_contract, tmp_path):
    c = load_contract(write_contract())
    check_artifacts(c)  # honest
    other = tmp_path / "other.jsonl"
    other.write_text(DATASET.read_text().replace("roars", "purrs"))
    tampered = load_contract(write_contract(dataset={"path": str(other)}))
    with pytest.raises(ContractViolationError, match="dataset_digest"):
        check_artifacts(tampered)


def test_recipe_builds_a_trainer_that_trains(write_contract, tmp_path):
    import transformers

    from aftune_hf.contract import load_recipe

    c = load_contract(write_contract(training={"max_steps": 2}))
    parts = load_recipe(c)(c, str(tmp_path / "out"), disable_tqdm=True)
    trainable = [n for n, p in parts.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    trainer = transformers.Trainer(**parts.trainer_kwargs())
    out = trainer.train()
    assert trainer.state.global_step == 2 and out.training_loss > 0
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[1] % 8 == 0 and (batch["labels"] == -100).any()
    with pytest.raises(ConfigError, match="override_contract"):
        load_recipe(c)(c, str(tmp_path / "out"), learning_rate=1.0)
