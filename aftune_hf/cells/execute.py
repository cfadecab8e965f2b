"""Re-execute one block of a decoder's layers from its boundary tensors, holding only that block.

A *cell* is (step, block): the block's forward from its input activation and its backward from
the gradient at its output. :func:`block_model` builds the recipe's model class from its config
with every parameter outside the block left on the ``meta`` device (buffers such as rotary
frequencies are built as usual), so memory is one block's share; :func:`run_block` then runs the
model's own forward with the opened input as ``inputs_embeds`` -- the layers before the block
pass it through, the forward stops at the block's last layer -- so masks, position embeddings
and layer arguments are the model's own, whatever its architecture.

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

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output


class _PassThrough(torch.nn.Module):
    """Stands in for a layer before the block: returns its hidden states unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@dataclass(frozen=True)
class CellRun:
    """What re-executing a cell yields: the block's output, the gradient at its input, its parameters' gradients."""

    output: torch.Tensor
    input_grad: torch.Tensor
    param_grads: dict[str, torch.Tensor]


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The model's stack of decoder layers: (its qualified name, the list) -- the first ``ModuleList``
    as long as ``config.num_hidden_layers``."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return name, module
    raise ValueError(f"{type(model).__name__} has no list of {n} decoder layers")


def block_model(config: transformers.PretrainedConfig, first: int, last: int, weights: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """The causal LM of ``config`` holding only layers ``first .. last - 1`` (loaded from ``weights``,
    named as in the full model's state dict); the layers before pass through, the rest stay on meta."""
    with init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(config)
    prefix, layers = decoder_layers(model)
    if not 0 <= first < last <= len(layers):
        raise ValueError(f"block {first}..{last} outside the model's {len(layers)} layers")
    for i in range(first):
        layers[i] = _PassThrough()
    wanted = {f"{prefix}.{i}.{n}" for i in range(first, last) for n, _ in layers[i].named_parameters()}
    missing = sorted(wanted - set(weights))
    if missing:
        raise ValueError(f"block weights lack {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    for i in range(first, last):
        layers[i].to_empty(device="cpu")
        with torch.no_grad():
            for n, p in layers[i].named_parameters():
                p.copy_(weights[f"{prefix}.{i}.{n}"])
    return model.train(False)


def run_block(model: torch.nn.Module, first: int, last: int, hidden: torch.Tensor, grad_out: torch.Tensor,
              **forward_kwargs: Any) -> CellRun:  # fmt: skip
    """Forward ``hidden`` (the input of layer ``first``) through the block and back-propagate
    ``grad_out`` (the gradient at layer ``last - 1``'s output). ``forward_kwargs`` (e.g.
    ``attention_mask``, ``position_ids``) are the training forward's own."""
    prefix, layers = decoder_layers(model)

    def stop(_m: Any, _a: Any, out: Any) -> None:
        raise _BlockDone(out[0] if isinstance(out, tuple) else out)

    x = hidden.detach().clone().requires_grad_(True)
    handle = layers[last - 1].register_forward_hook(stop)
    try:
        model(inputs_embeds=x, use_cache=False, **forward_kwargs)
    except _BlockDone as done:
        output = done.output
    else:  # pragma: no cover - the hook always fires
        raise RuntimeError("the block's last layer did not run")
    finally:
        handle.remove()
    params = {f"{prefix}.{i}.{n}": p for i in range(first, last) for n, p in layers[i].named_parameters()}
    grads = torch.autograd.grad(output, [x, *params.values()], grad_out, allow_unused=True)
    zero = [torch.zeros_like(p) for p in params.values()]
    return CellRun(output.detach(), grads[0],
                   {n: g if g is not None else z for (n, _), g, z in zip(params.items(), grads[1:], zero)})  # fmt: skip
