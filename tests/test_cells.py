"""Layer-block cells (issue 19, first piece): one block re-executed from its boundary tensors
reproduces the full model's block output, input gradient and parameter gradients bit for bit,
holding only that block's parameters."""

from __future__ import annotations

import pytest
import torch
import transformers

from aftune_hf.cells.execute import block_model, decoder_layers, run_block


def tiny(layers: int = 4) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def full_step(model, ids, first, last):
    """The boundary tensors of block ``first..last`` in one ordinary training forward/backward."""
    _, layers = decoder_layers(model)
    seen = {}

    def pre(_m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        seen["input"] = x.detach().clone()
        x.register_hook(lambda g: seen.__setitem__("input_grad", g.clone()))

    def post(_m, _a, out):
        seen["output"] = out.detach().clone()
        out.register_hook(lambda g: seen.__setitem__("grad_out", g.clone()))

    hs = [layers[first].register_forward_pre_hook(pre, with_kwargs=True), layers[last - 1].register_forward_hook(post)]
    model(input_ids=ids, labels=ids).loss.backward()
    for h in hs:
        h.remove()
    return seen


@pytest.mark.parametrize("first,last", [(1, 3), (0, 1), (2, 4)])
def test_a_block_reexecuted_alone_matches_the_full_step_bit_for_bit(first, last):
    model = tiny()
    ids = torch.randint(0, 96, (2, 12))
    seen = full_step(model, ids, first, last)
    cell = block_model(model.config, first, last, model.state_dict())
    run = run_block(cell, first, last, seen["input"], seen["grad_out"])
    assert torch.equal(run.output, seen["output"])
    assert torch.equal(run.input_grad, seen["input_grad"])
    grads = dict(model.named_parameters())
    assert run.param_grads and all(torch.equal(g, grads[n].grad) for n, g in run.param_grads.items())
    held = sum(p.numel() for p in cell.parameters() if p.device.type != "meta")
    block = sum(p.numel() for n, p in model.named_parameters() if any(n.startswith(f"model.layers.{i}.") for i in range(first, last)))
    assert held == block == sum(g.numel() for g in run.param_grads.values())  # only the block is in memory


def test_a_nudged_block_or_a_forged_input_is_seen_in_the_output():
    model = tiny()
    ids = torch.randint(0, 96, (2, 12))
    seen = full_step(model, ids, 1, 3)
    weights = dict(model.state_dict())
    weights["model.layers.2.mlp.down_proj.weight"] = weights["model.layers.2.mlp.down_proj.weight"] + 1e-6
    assert not torch.equal(run_block(block_model(model.config, 1, 3, weights), 1, 3, seen["input"], seen["grad_out"]).output,
                           seen["output"])  # fmt: skip
    cell = block_model(model.config, 1, 3, model.state_dict())
    assert not torch.equal(run_block(cell, 1, 3, seen["input"] * (1 + 1e-6), seen["grad_out"]).output, seen["output"])


def test_a_block_outside_the_model_or_without_its_weights_is_refused():
    model = tiny()
    with pytest.raises(ValueError, match="outside"):
        block_model(model.config, 3, 5, model.state_dict())
    weights = {k: v for k, v in model.state_dict().items() if "layers.1.mlp" not in k}
    with pytest.raises(ValueError, match="lack"):
        block_model(model.config, 1, 2, weights)
