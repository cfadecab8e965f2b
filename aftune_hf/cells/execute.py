"""Re-execute one block of a decoder's layers from its boundary tensors, holding only that block.

A *cell* is (step, block): the block's forward from its input activation and its backward from
the gradient at its output. :func:`block_model` builds the recipe's model class from its config
with every parameter outside the block left on the ``meta`` device (buffers such as rotary
frequencies are built as usual), so memory is one block's share; :func:`run_block` then runs the
model's own forward: the layers before the block pass through, a hook hands the opened input to
the block's first layer, the forward stops at its last layer (or, for the last block, runs on to
the loss) -- so masks, position embeddings and layer arguments are the model's own, whatever
its architecture (Llama-style and GPT-2-style tested).

Example:
    >>> model = block_model(config, 2, 4, block_weights)                    # doctest: +SKIP
    >>> out = run_block(model, 2, 4, x, grad_out)                           # doctest: +SKIP
    >>> out.output, out.input_grad, out.param_grads["model.layers.2.mlp.up_proj.weight"]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from accelerate import init_empty_weights


class _BlockDone(Exception):
    """Raised by the hook on the block's last layer: nothing after the block is run."""

    def __init__(self, output: torch.Tensor, rng: torch.Tensor) -> None:
        super().__init__()
        self.output, self.rng = output, rng


class _PassThrough(torch.nn.Module):
    """Stands in for a layer before the block: returns its hidden states unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@dataclass(frozen=True)
class CellRun:
    """What re-executing a cell yields: the block's output, the gradient at its input, its parameters' gradients."""

    output: torch.Tensor
    input_grad: torch.Tensor | None
    param_grads: dict[str, torch.Tensor]
    rng_out: torch.Tensor | None = None  # the generator state where the block ended (a block before the last)


def meta_model(config: transformers.PretrainedConfig) -> torch.nn.Module:
    """The causal LM of ``config`` with every parameter on ``meta`` (buffers real), tied as the real one is
    (``init_empty_weights`` would leave a tied head a separate meta tensor)."""
    with init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=getattr(config, "_attn_implementation", None))
    model.tie_weights()
    return model


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The model's stack of decoder layers: (its qualified name, the list) -- the first ``ModuleList``
    as long as ``config.num_hidden_layers``."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return name, module
    raise ValueError(f"{type(model).__name__} has no list of {n} decoder layers")


def _outside(model: torch.nn.Module, prefix: str) -> tuple[list[str], list[str]]:
    """Parameter names outside the decoder layers, (registered before them, after them); tied ones
    (a head sharing the embedding matrix) are listed under each name."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    inside = [i for i, n in enumerate(names) if n.startswith(prefix + ".")]
    return names[: inside[0]], names[inside[-1] + 1 :]


def tied(model: torch.nn.Module) -> dict[str, str]:
    """Parameters registered under a second name: ``{later name: first name}`` -- e.g. a head tied
    to the token embedding, ``{"lm_head.weight": "model.embed_tokens.weight"}``."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def _block_names(model: torch.nn.Module, first: int, last: int) -> list[str]:
    """The names of block ``first .. last - 1``'s parameters: its layers', block 0's also what is
    registered before the layers (embeddings), the last block's what is registered after them."""
    prefix, layers = decoder_layers(model)
    before, after = _outside(model, prefix)
    names = [f"{prefix}.{i}.{n}" for i in range(first, last) for n, _ in layers[i].named_parameters()]
    return names + (before if first == 0 else []) + (after if last == len(layers) else [])


def _materialise(model: torch.nn.Module, names: list[str], weights: Mapping[str, torch.Tensor] | None) -> None:
    """Give parameters ``names`` real CPU storage: ``weights``' values, or zeros (values never used)."""
    for name in names:
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        value = torch.zeros_like(getattr(module, leaf), device="cpu") if weights is None else weights[name]
        setattr(module, leaf, torch.nn.Parameter(value.detach().clone(), requires_grad=True))


def block_model(config: transformers.PretrainedConfig, first: int, last: int, weights: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """The causal LM of ``config`` holding only block ``first .. last - 1`` (loaded from ``weights``,
    named as in the full model's state dict): the layers before it pass through, the rest stay on
    ``meta``. Block 0 also holds what runs before the first layer (embeddings); a block ending at
    the last layer also holds what runs after it (final norm, head). A later block gets zeros for
    the small tables the model computes before its layers (e.g. position embeddings): their
    result is replaced by the opened input."""
    model = meta_model(config)
    prefix, layers = decoder_layers(model)
    if not 0 <= first < last <= len(layers):
        raise ValueError(f"block {first}..{last} outside the model's {len(layers)} layers")
    wanted = _block_names(model, first, last)
    missing = sorted(set(wanted) - set(weights))
    if missing:
        raise ValueError(f"block weights lack {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    for i in range(first):
        layers[i] = _PassThrough()
    if first > 0:  # not the input embedding matrix: ``run_block`` feeds ``inputs_embeds``
        embedding = model.get_input_embeddings().weight
        _materialise(model, [n for n in _outside(model, prefix)[0] if model.get_parameter(n) is not embedding], None)
    _materialise(model, wanted, weights)
    return model.train(False)


def run_block(model: torch.nn.Module, first: int, last: int, inputs: torch.Tensor, grad_out: torch.Tensor, *,
              rng: torch.Tensor | None = None, accumulate: bool = False, **forward_kwargs: Any) -> CellRun:  # fmt: skip
    """Re-execute block ``first .. last - 1``: forward ``inputs`` -- the input of layer ``first``, or
    the token ids for block 0 -- and back-propagate ``grad_out``: the gradient at the block's last
    layer's output, or, for a block ending at the model's last layer, of the loss (a scalar; pass
    ``labels`` in ``forward_kwargs``). ``forward_kwargs`` are the training forward's own
    (``attention_mask``, ``position_ids``, ``labels``). The input gradient is None for block 0.
    ``rng``: the generator state (:func:`aftune_hf.cells.track.rng_state`) the block starts from, set
    where it starts (dropout). ``accumulate``: add the parameter gradients into ``.grad``, as the
    Trainer's backward over several micro-batches does (``param_grads`` then holds ``.grad``)."""
    from .track import rng_state, set_rng_state

    device = next(p for p in model.parameters() if p.device.type != "meta").device
    layers = decoder_layers(model)[1]
    ends = last == len(layers)
    x = inputs if first == 0 else inputs.detach().clone().requires_grad_(True)
    hooks = []

    def swap_in(_m: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:  # the opened input, whatever came before
        if rng is not None:
            set_rng_state(rng, device)
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    def stop(_m: Any, _a: Any, out: Any) -> None:
        raise _BlockDone(out[0] if isinstance(out, tuple) else out, rng_state(device))

    if first > 0:
        hooks.append(layers[first].register_forward_pre_hook(swap_in, with_kwargs=True))
    if not ends:
        hooks.append(layers[last - 1].register_forward_hook(stop))
    feed = {"input_ids": inputs} if first == 0 else {"inputs_embeds": torch.zeros_like(x, requires_grad=False)}
    if rng is not None and first == 0:
        set_rng_state(rng, device)
    try:
        rng_out = None
        result = model(**feed, use_cache=False, **forward_kwargs)
        output = result.loss
        if output is None:
            raise ValueError("a block ending at the last layer needs the step's labels to compute its loss")
    except _BlockDone as done:
        output, rng_out = done.output, done.rng
    finally:
        for h in hooks:
            h.remove()
    params = {n: model.get_parameter(n) for n in _block_names(model, first, last)}
    wrt = list(params.values()) if first == 0 else [x, *params.values()]
    if accumulate:
        torch.autograd.backward(output, grad_out, inputs=wrt)
        return CellRun(output.detach(), None if first == 0 else x.grad, {n: p.grad for n, p in params.items()}, rng_out)
    grads = torch.autograd.grad(output, wrt, grad_out, allow_unused=True)
    grads = (None, *grads) if first == 0 else grads
    return CellRun(output.detach(), grads[0],
                   {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads[1:])}, rng_out)  # fmt: skip
