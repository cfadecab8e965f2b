"""Layer-block cells (issue 19, first piece): one block re-executed from its boundary tensors
reproduces the full model's block output, input gradient and parameter gradients bit for bit,
holding only that block's parameters."""

from __future__ import annotations

import pytest
import torch
import transformers

from aftune_hf.cells.execute import block_model, decoder_layers, run_block


def tiny(kind: str = "llama", layers: int = 4) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    if kind == "gpt2":  # position embeddings before the layers, a head tied to the embeddings, layers returning tuples
        cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=layers, n_head=4, n_positions=64, bos_token_id=0,
                                      eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def full_step(model, ids):
    """One ordinary training forward/backward: the loss, and per layer its output and the gradient there."""
    _, layers = decoder_layers(model)
    seen = {}

    def post(i):
        def hook(_m, _a, out):
            out = out[0] if isinstance(out, tuple) else out
            seen[i] = out.detach().clone()
            out.register_hook(lambda g: seen.__setitem__(("grad", i), g.clone()))

        return hook

    hs = [layer.register_forward_hook(post(i)) for i, layer in enumerate(layers)]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for h in hs:
        h.remove()
    seen["loss"] = loss.detach()
    return seen


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("cuts", [[0, 1, 3, 4], [0, 4], [0, 2, 4]])
def test_each_block_reexecuted_alone_matches_the_full_step_bit_for_bit(kind, cuts):
    model = tiny(kind)
    ids = torch.randint(0, 96, (2, 12))
    seen = full_step(model, ids)
    n = len(decoder_layers(model)[1])
    full = {name: p.grad for name, p in model.named_parameters(remove_duplicate=False)}
    summed: dict[str, torch.Tensor] = {}
    for first, last in zip(cuts, cuts[1:]):
        cell = block_model(model.config, first, last, model.state_dict())
        ends = last == n
        run = run_block(cell, first, last, ids if first == 0 else seen[first - 1],
                        torch.tensor(1.0) if ends else seen[("grad", last - 1)], **({"labels": ids} if ends else {}))  # fmt: skip
        assert torch.equal(run.output, seen["loss"] if ends else seen[last - 1])
        assert (run.input_grad is None) == (first == 0)
        if first:
            assert torch.equal(run.input_grad, seen[("grad", first - 1)])
        held = sum(p.numel() for p in cell.parameters() if p.device.type != "meta")
        assert held - sum(g.numel() for g in run.param_grads.values()) in (0, 64 * 32)  # the block (+ a zeroed position table)
        for name, g in run.param_grads.items():
            summed[name] = summed[name] + g if name in summed else g
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if tied:  # the head's and the embedding's contributions to one matrix, added as autograd adds them
        head, emb = "lm_head.weight", "transformer.wte.weight"
        summed[emb] = summed[emb] + summed.pop(head)
        full.pop(head)
    assert summed.keys() == full.keys()
    assert all(torch.equal(summed[k], full[k]) for k in full), [k for k in full if not torch.equal(summed[k], full[k])]


def test_a_nudged_block_or_a_forged_input_is_seen_in_the_output():
    model = tiny()
    ids = torch.randint(0, 96, (2, 12))
    seen = full_step(model, ids)
    weights = dict(model.state_dict())
    weights["model.layers.2.mlp.down_proj.weight"] = weights["model.layers.2.mlp.down_proj.weight"] + 1e-6
    assert not torch.equal(run_block(block_model(model.config, 1, 3, weights), 1, 3, seen[0], seen[("grad", 2)]).output, seen[2])
    cell = block_model(model.config, 1, 3, model.state_dict())
    assert torch.equal(run_block(cell, 1, 3, seen[0], seen[("grad", 2)]).output, seen[2])
    assert not torch.equal(run_block(cell, 1, 3, seen[0] * (1 + 1e-6), seen[("grad", 2)]).output, seen[2])
    with pytest.raises(ValueError, match="labels"):
        run_block(block_model(model.config, 3, 4, model.state_dict()), 3, 4, seen[2], torch.tensor(1.0))


def test_a_block_outside_the_model_or_without_its_weights_is_refused():
    model = tiny()
    with pytest.raises(ValueError, match="outside"):
        block_model(model.config, 3, 5, model.state_dict())
    weights = {k: v for k, v in model.state_dict().items() if "layers.1.mlp" not in k}
    with pytest.raises(ValueError, match="lack"):
        block_model(model.config, 1, 2, weights)


# -- contract, challenge and plan (no training) -------------------------------------------------


def _contract(**audit):
    import yaml

    from aftune_hf.contract import Contract
    from tests.conftest import CONFIGS

    data = yaml.safe_load((CONFIGS / "tiny-full.yaml").read_text())
    data["audit"].update(audit)
    return Contract.from_dict(data)


@pytest.mark.parametrize("blocks", [[1, 2], [0, 2, 2], [0], [0, 3, 1]])
def test_layer_blocks_must_rise_from_zero(blocks):
    from aftune_hf.errors import ConfigError

    with pytest.raises(ConfigError, match="rise strictly from 0"):
        _contract(layer_blocks=blocks)


@pytest.mark.parametrize("change, what", [({"audit": {"mode": "tolerance", "tolerance": 0.1, "checkpoint_every": 1}}, "mode: tolerance"),
                                          ({"training": {"world_size": 2}}, "several processes"),
                                          ({"training": {"precision": "bf16"}}, "precision bf16"),
                                          ({"peft": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}}, "PEFT")])  # fmt: skip
def test_cells_outside_their_scope_are_refused_by_the_contract(change, what):
    import yaml

    from aftune_hf.contract import Contract
    from aftune_hf.errors import ConfigError
    from tests.conftest import CONFIGS

    data = yaml.safe_load((CONFIGS / "tiny-full.yaml").read_text())
    data["audit"]["layer_blocks"] = [0, 1, 2]
    for section, values in change.items():
        data[section] = {**data.get(section, {}), **values}
    with pytest.raises(ConfigError, match=f"not with {what}"):
        Contract.from_dict(data)


def test_a_contract_without_cells_keeps_its_digest():
    """``layer_blocks``/``cells`` enter the canonical form only when set: older contracts hash as before."""
    plain, cells = _contract(), _contract(layer_blocks=[0, 1, 2])
    assert "layer_blocks" not in plain.canonical()["audit"] and "cells" not in plain.canonical()["audit"]
    assert cells.canonical()["audit"]["layer_blocks"] == [0, 1, 2] and plain.digest() != cells.digest()
    assert _contract(cells=3).digest() == plain.digest()  # only meaningful with blocks


def test_the_challenge_is_uniform_over_the_grid():
    from collections import Counter

    from aftune_hf.cells.opening import challenge_cells

    c = _contract(layer_blocks=[0, 1, 2])  # 12 steps x 2 blocks
    seen = Counter()
    for i in range(300):
        cells = challenge_cells(c, bytes(32), i.to_bytes(8, "big"), 6)
        assert len(set(cells)) == 6 and all(1 <= x.step <= 12 and x.block in (0, 1) for x in cells)
        seen.update(cells)
    assert len(seen) == 24 and max(seen.values()) < 2 * min(seen.values())  # each cell about 300 * 6 / 24 = 75 times


def test_the_plan_prices_cells_by_their_blocks():
    from aftune_hf.cells.plan import block_costs, cell_plan
    from aftune_hf.report import plan

    config = tiny("llama", layers=4).config
    shares, sizes = block_costs(config, [0, 2, 4])
    assert abs(sum(shares) - 1) < 1e-12 and len(sizes) == 2
    h, v = config.hidden_size, config.vocab_size
    assert sizes[1] - sizes[0] == 16 * h  # both hold two layers and a v x h table; the last also the final norm
    layer = (sizes[0] / 16 - v * h) / 2  # parameters of one layer
    assert shares[0] == pytest.approx(2 * layer / (4 * layer + h + v * h))  # the input table is indexed, not multiplied
    p = cell_plan(1000, [0.25] * 4, 0.1, 0.99)
    assert p["cells"] == 44 and p["probability"] >= 0.99 and abs(p["flops_share"] - 44 * 0.25 / 1000) < 1e-12
    assert plan(1000, 10, 0.1, 0.99)["share_reexecuted"] > 30 * p["flops_share"]  # whole windows: ~37 %
