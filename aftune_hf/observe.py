"""Observe the optimizer steps of a ``transformers.Trainer``: what each step was fed and what it did.

:class:`StepObserver` is shared by the recorder (:class:`~aftune_hf.callback.AuditCallback`
commits what it observes) and the verifier's replay (which observes the same way and compares):
the micro-batches fed to the model (a forward pre-hook), the loss, the learning rate applied,
the gradient norm and the trainable state after the step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import TrainerCallback

from . import digest as D
from .errors import RecorderError
from .live import trainable_params


def fed_digest(args: tuple, kwargs: dict) -> tuple[bytes, int | None]:
    """Batch digest of what one forward call was fed, and its ``num_items_in_batch`` (which the
    Trainer adds to the call; it is committed on its own, not in the digest)."""
    if args:
        raise RecorderError("capture_failed", "the model was called with positional tensors")
    n = kwargs.get("num_items_in_batch")
    return D.batch_digest({k: v for k, v in kwargs.items() if k != "num_items_in_batch"}), None if n is None else int(n)


class StepCapture:
    """Forward hooks that capture, per optimizer step, what the model was fed and returned.

    Only forwards in training mode with autograd on between ``begin()`` and ``end()`` count, so
    evaluation, prediction, generation and a trainer's extra no-grad metrics forward are ignored.
    """

    def __init__(self) -> None:
        self.active = False
        self.batches: list[bytes] = []
        self.num_items: int | None = None
        self.loss: torch.Tensor | None = None
        self._handles: list[Any] = []

    def install(self, model: torch.nn.Module) -> None:
        self.remove()
        self._handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post, with_kwargs=True),
        ]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def begin(self) -> None:
        self.active, self.batches, self.num_items, self.loss = True, [], None, None

    def end(self) -> tuple[list[bytes], int | None, float]:
        self.active = False
        loss = math.nan if self.loss is None else float(self.loss)
        return self.batches, self.num_items, loss

    def _counts(self, module: torch.nn.Module) -> bool:
        return self.active and module.training and torch.is_grad_enabled()

    def _pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._counts(module):
            return
        digest, n = fed_digest(args, kwargs)
        self.batches.append(digest)
        self.num_items = n

    def _post(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._counts(module):
            return
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().double()
            self.loss = loss if self.loss is None else self.loss + loss


class StepObserver(TrainerCallback):
    """Observe every optimizer step of a Trainer: micro-batches, loss, lr applied, grad norm, state.

    The recorder (:class:`AuditCallback`) commits what it observes; the verifier's replay
    observes the same way and compares.
    """

    def __init__(self) -> None:
        self.capture = StepCapture()
        self._lr: float = math.nan
        self._grad_norm: float | None = None
        self._trainable: tuple[Any, dict[str, torch.Tensor]] | None = None

    def trainable(self, model: Any) -> dict[str, torch.Tensor]:
        """:func:`~aftune_hf.live.trainable_params` of ``model``, looked up once per model (walking a
        PEFT model's parameters costs ~0.7 ms, twice a step); the tensors are live references."""
        if self._trainable is None or self._trainable[0] is not model:
            self._trainable = (model, trainable_params(model))
        return self._trainable[1]

    def on_step_begin(self, args, state, control, **kwargs):
        self.capture.begin()

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in self.trainable(model).values() if p.grad is not None]
        self._grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else None

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self._lr = float(optimizer.param_groups[0]["lr"])

    def observe(
        self, state: Any, model: Any, *, state_digest: bool = True
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The step's record fields (all but ``checkpoint``/``anchor``; ``state`` only when
        ``state_digest``) and the live trainable tensors."""
        step = state.global_step
        batches, num_items, loss = self.capture.end()
        if not batches:
            raise RecorderError("capture_failed", "no training forward pass was captured", step=step)
        params = self.trainable(model)
        fields = dict(step=step, batches=[batches], num_items=num_items, loss=loss, lr=self._lr,
                      grad_norm=self._grad_norm)  # fmt: skip
        if state_digest:
            fields["state"] = D.state_digest(params)
        return fields, params
