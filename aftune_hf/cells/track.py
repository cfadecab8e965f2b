"""The per-step commitments of layer-block cells: what a cell check re-derives, digested as training runs.

With ``audit.layer_blocks`` the recorder installs a :class:`CellTracker` on the unwrapped model.
For every training micro-batch it digests, at each block boundary, the activation passed forward
(the output of the block's last layer) and the gradient passed back into it, the RNG state each
block starts from (so dropout re-runs), and the gradient flowing into the loss; for the step, each
trainable tensor's pre-clip gradient norm and their total, exactly as the Trainer's clipping
computes them. :meth:`CellTracker.end` returns the step's *cell table*; its
:func:`table_digest` is the step record's ``cells``. Tensors are never stored: a provider opening a
cell regenerates them from its anchor (:mod:`aftune_hf.cells.opening`, ``keep=True``).

Example:
    >>> tracker = CellTracker((0, 2, 4))
    >>> tracker.install(model, trainer)              # doctest: +SKIP
    >>> tracker.begin(); trainer.training_step(...)  # doctest: +SKIP
    >>> table_digest(tracker.end())                  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .. import digest as D
from ..errors import RecorderError
from .execute import _block_names, decoder_layers, tied


def table_digest(table: dict[str, Any]) -> bytes:
    """The step record's ``cells``: the digest of the canonical JSON of a cell table."""
    return D.hash_bytes("cells table", D.canonical_json(table))


def tensor_hex(t: torch.Tensor) -> str:
    """:func:`aftune_hf.digest.tensor_digest` in hex, computed where ``t`` lives (on a GPU only 32 bytes leave it)."""
    if t.device.type == "cuda":
        from ..device_blake3 import tensor_digests

        return tensor_digests([t.detach()])[0].hex()
    return D.tensor_digest(t).hex()


def optimizer_tensors(model: Any, optimizer: Any) -> dict[str, torch.Tensor]:
    """The optimizer's state tensors named as an anchor names them (``state/<parameter>/<key>``), live
    and where they are (no copy: read them before the next ``optimizer.step``)."""
    from ..live import unwrap

    inner = getattr(optimizer, "optimizer", optimizer)
    by_id = {id(p): n for n, p in unwrap(model).named_parameters()}
    return {f"state/{by_id[id(p)]}/{k}": v.detach() for p, st in inner.state.items() if id(p) in by_id
            for k, v in st.items() if isinstance(v, torch.Tensor)}  # fmt: skip


def optimizer_digest(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """``S`` of the optimizer state (the step record's ``optim``), hashed where the tensors are."""
    if any(t.device.type == "cuda" for t in tensors.values()):
        from ..device_blake3 import state_digest

        return state_digest(dict(tensors))
    return D.state_digest(tensors)


def rng_state(device: torch.device) -> torch.Tensor:
    """The generator state dropout on ``device`` draws from, as one uint8 tensor (CPU; CUDA's appended)."""
    parts = [torch.get_rng_state()]
    if device.type == "cuda":
        parts.append(torch.cuda.get_rng_state(device))
    return torch.cat(parts)


def set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    """Inverse of :func:`rng_state`."""
    cpu = torch.get_rng_state().numel()
    torch.set_rng_state(state[:cpu].clone())
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[cpu:].clone(), device)


def rng_hex(state: torch.Tensor) -> str:
    return D.hash_bytes("cells rng", D.tensor_bytes(state)).hex()


def tensor_norms(grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor 2-norms as ``torch.nn.utils.get_total_norm`` computes them for one device and dtype."""
    return list(torch._foreach_norm(list(grads), 2.0))


def total_norm(norms: Sequence[torch.Tensor]) -> torch.Tensor:
    """The total of per-tensor norms, as ``get_total_norm`` combines them."""
    return torch.linalg.vector_norm(torch.stack(list(norms)), 2.0)


def block_ranges(boundaries: Sequence[int]) -> list[tuple[int, int]]:
    return list(zip(boundaries, boundaries[1:]))


def tied_across_blocks(model: torch.nn.Module, blocks: Sequence[tuple[int, int]],
                       trainable: Mapping[int, str] | None = None) -> list[tuple[str, str]]:  # fmt: skip
    """The tied tensors whose uses lie in two blocks, as ``(later name, first name)``: only a table
    registered before the layers (block 0) shared with one after them (the last block) is committable."""
    if len(blocks) < 2:
        return []
    names = [_block_names(model, first, last) for first, last in blocks]
    out = []
    for alias, owner in tied(model).items():
        if trainable is not None and id(model.get_parameter(owner)) not in trainable:
            continue
        if owner not in names[0] or alias not in names[-1] or any(alias in n or owner in n for n in names[1:-1]):
            raise RecorderError("cells_unsupported", f"{alias} shares {owner}'s tensor across blocks other than the "
                                "first and the last; cells do not commit that")  # fmt: skip
        out.append((alias, owner))
    return out


def gradient_edge(output: torch.Tensor, weight: torch.Tensor, depth: int = 8) -> tuple[Any, int]:
    """The autograd node nearest ``output`` that passes a gradient straight to leaf ``weight``, and the
    index of that edge (e.g. the transpose in ``F.linear``'s graph)."""
    frontier, seen = [output.grad_fn], set()
    for _ in range(depth):
        following = []
        for node in frontier:
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            for i, (fn, _) in enumerate(node.next_functions):
                if fn is not None and getattr(fn, "variable", None) is weight:
                    return node, i
                following.append(fn)
        frontier = following
    raise RecorderError("cells_unsupported", "the tied head's use of its weight was not found in the autograd graph")


class CellTracker:
    """Hooks that build each step's cell table (``keep``: also hold the tensors, for an opening).

    Only forward passes of a training forward (module in training mode, autograd on, between the
    model's own pre- and post-hook) count, so evaluation, generation and gradient-checkpointing
    recomputation are ignored.
    """

    def __init__(self, boundaries: Sequence[int], *, keep: bool = False) -> None:
        self.blocks = block_ranges(boundaries)
        self.keep = keep
        self.active = False
        self.micro: list[dict[str, Any]] = []
        self.kept: list[dict[str, torch.Tensor]] = []
        self.norms: dict[str, str] | None = None
        self.total: str | None = None
        self._in_forward = False
        self._handles: list[Any] = []
        self._accelerator: Any = None
        self._names: dict[int, str] = {}
        self.ties: list[tuple[str, str]] = []  # (head name, embedding name) of a tied head
        self.error: RecorderError | None = None  # raised by end(), not inside the Trainer's forward or clipping

    # -- install -------------------------------------------------------------------------------

    def install(self, model: torch.nn.Module, trainer: Any) -> None:
        """Hook ``model`` (unwrapped) and the gradient clipping of ``trainer``'s accelerator."""
        self.remove()
        _, layers = decoder_layers(model)
        if self.blocks[-1][1] != len(layers):
            raise RecorderError("cells_unsupported", f"audit.layer_blocks ends at {self.blocks[-1][1]} but the model "
                                f"has {len(layers)} decoder layers")  # fmt: skip
        trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        self.ties = tied_across_blocks(model, self.blocks, trainable)
        if trainer is None:
            raise RecorderError("cells_unsupported", "layer-block cells need the running Trainer (its gradient clipping)")
        self._names = trainable
        h = [model.register_forward_pre_hook(self._model_pre, with_kwargs=True), model.register_forward_hook(self._model_post)]
        for b, (first, last) in enumerate(self.blocks):
            if b > 0:
                h.append(layers[first].register_forward_pre_hook(self._entry(b)))
            if b < len(self.blocks) - 1:
                h.append(layers[last - 1].register_forward_hook(self._boundary(b)))
        for k, (alias, owner) in enumerate(self.ties):
            h.append(model.get_submodule(alias.rpartition(".")[0]).register_forward_hook(self._tie(k, model.get_parameter(owner))))
        self._handles = h
        self._accelerator = trainer.accelerator
        original = trainer.accelerator.clip_grad_norm_

        def clip(parameters: Any, max_norm: float, *args: Any, **kwargs: Any) -> Any:
            parameters = list(parameters)
            mine = self._norms(parameters) if self.active and self.norms is None else None
            result = original(parameters, max_norm, *args, **kwargs)
            if mine is not None and not torch.equal(mine, torch.as_tensor(result, device=mine.device)):
                self._fail(RecorderError("cells_unsupported", "the Trainer's gradient norm is not the total of its "
                                         f"tensors' norms ({float(result)!r} vs {float(mine)!r}); cells cannot commit it"))  # fmt: skip
            return result

        trainer.accelerator.clip_grad_norm_ = clip

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._accelerator is not None:
            self._accelerator.__dict__.pop("clip_grad_norm_", None)
            self._accelerator = None

    # -- per step ------------------------------------------------------------------------------

    def step_begin(self, step: int, model: Any, optimizer: Any) -> None:
        """A replay's step ``step`` begins (the recorder calls :meth:`begin`)."""
        self.begin()

    def step_end(self, step: int, model: Any, optimizer: Any) -> dict[str, bytes]:
        """A replayed step's ``cells`` and ``optim`` record fields, made as the recorder makes them."""
        return {"cells": table_digest(self.end()), "optim": optimizer_digest(optimizer_tensors(model, optimizer))}

    def begin(self) -> None:
        self.active, self.micro, self.kept, self.norms, self.total = True, [], [], None, None

    def _fail(self, error: RecorderError) -> None:
        """A hook's problem: kept for :meth:`end` (the recorder's step end fails closed there)."""
        self.error = self.error or error

    def end(self) -> dict[str, Any]:
        """The step's cell table (see docs/FORMAT.md, Cells)."""
        self.active = False
        if self.error is not None:
            raise self.error
        if not self.micro or self.norms is None:
            raise RecorderError("capture_failed", "layer-block cells: no training forward or no gradient clipping seen")
        for m in self.micro:
            if m["loss_grad"] is None:
                raise RecorderError("cells_unsupported", "the model's own loss was not back-propagated: the Trainer "
                                    "trains on a loss of its own, which layer-block cells do not cover")  # fmt: skip
            if None in m["rng"] or None in m["act"] or None in m["grad"] or None in m.get("tied", ()):
                raise RecorderError("capture_failed", "layer-block cells: a block boundary was not passed in both directions")
        return {"blocks": [list(b) for b in self.blocks], "micro": self.micro, "norms": self.norms, "total": self.total}

    # -- hooks ---------------------------------------------------------------------------------

    def _counts(self, module: torch.nn.Module) -> bool:
        return self.active and module.training and torch.is_grad_enabled()

    def _model_pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._counts(module):
            return
        self._in_forward = True
        n = len(self.blocks)
        self.micro.append({"rng": [None] * n, "act": [None] * (n - 1), "grad": [None] * (n - 1), "loss_grad": None,
                           **({"tied": [None] * len(self.ties)} if self.ties else {})})  # fmt: skip
        self.kept.append({f"batch/{k}": v.detach().clone() for k, v in kwargs.items()
                          if self.keep and isinstance(v, torch.Tensor) and k != "num_items_in_batch"})  # fmt: skip
        self._rng(0, next(module.parameters()).device)

    def _model_post(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if not (self._in_forward and self._counts(module)):
            return
        self._in_forward = False
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            return  # end() reports the loss gradient it never saw
        micro, kept = self.micro[-1], self.kept[-1]

        def grad(g: torch.Tensor) -> None:
            micro["loss_grad"] = D.encode_float(float(g))
            if self.keep:
                kept["loss_grad"] = g.detach().clone()

        loss.register_hook(grad)

    def _rng(self, b: int, device: torch.device) -> None:
        state = rng_state(device)
        self.micro[-1]["rng"][b] = rng_hex(state)
        if self.keep:
            self.kept[-1][f"rng/{b}"] = state

    def _entry(self, b: int) -> Any:
        def pre(module: torch.nn.Module, args: tuple) -> None:
            if self._in_forward and self._counts(module):
                self._rng(b, next(module.parameters()).device)

        return pre

    def _boundary(self, b: int) -> Any:
        def post(module: torch.nn.Module, args: tuple, output: Any) -> None:
            if not (self._in_forward and self._counts(module)):
                return
            h = output[0] if isinstance(output, tuple) else output
            micro, kept = self.micro[-1], self.kept[-1]
            micro["act"][b] = tensor_hex(h)
            if self.keep:
                kept[f"act/{b}"] = h.detach().clone()

            def grad(g: torch.Tensor) -> None:
                micro["grad"][b] = tensor_hex(g)
                if self.keep:
                    kept[f"grad/{b}"] = g.detach().clone()

            h.register_hook(grad)

        return post

    def _tie(self, k: int, weight: torch.Tensor) -> Any:
        """The later use of tied tensor ``k`` (a head): commit, per micro-batch, the gradient it adds to
        the shared tensor -- the very tensor autograd sums with the first use's -- by a hook on the
        graph node that passes it on."""

        def post(module: torch.nn.Module, args: tuple, output: Any) -> None:
            if not (self._in_forward and self._counts(module)):
                return
            try:
                node, i = gradient_edge(output, weight)
            except RecorderError as e:
                return self._fail(e)
            micro, kept = self.micro[-1], self.kept[-1]

            def grab(grad_inputs: tuple, _grad_outputs: tuple) -> None:
                micro["tied"][k] = tensor_hex(grad_inputs[i])
                if self.keep:
                    kept[f"tied/{k}"] = grad_inputs[i].detach().clone()

            node.register_hook(grab)

        return post

    def _norms(self, parameters: list[torch.Tensor]) -> torch.Tensor | None:
        named = [(self._names[id(p)], p.grad) for p in parameters if p.grad is not None and id(p) in self._names]
        if not named or len({(g.device, g.dtype) for _, g in named}) != 1:
            self._fail(RecorderError("cells_unsupported", "layer-block cells need every gradient on one device in one dtype"))
            return None
        norms = tensor_norms([g for _, g in named])
        self.norms = {n: D.encode_float(float(v)) for (n, _), v in zip(named, norms)}
        total = total_norm(norms)
        self.total = D.encode_float(float(total))
        return total
