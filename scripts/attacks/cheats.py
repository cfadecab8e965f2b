"""Cheats a provider can commit *inside* training, before the recorder sees anything.

The recorder then commits the cheated run faithfully, so the trace is self-consistent; only
re-execution (or the data check) can tell. Used by the tests, the tolerance-gap measurement
and the red-team kit.
"""

from __future__ import annotations

import torch
import transformers


class Cheat(transformers.TrainerCallback):
    """A provider cheating inside training; the recorder then commits the cheated run faithfully."""

    def __init__(self, kind: str, step: int, amount: float | None = None) -> None:
        """``kind``: ``skip_update`` | ``lr`` (scale the lr by ``amount``, default 0.5) |
        ``nudge`` (add ``amount``, default 1e-4, to one trainable tensor after the step) |
        ``drift`` (from ``step`` on, scale every trainable tensor by ``1 + amount`` after each step)."""
        self.kind, self.step, self._saved = kind, step, None
        self.amount = amount

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        if state.global_step + 1 != self.step and not (self.kind == "lr" and self.step == 0):
            return
        if self.kind == "skip_update":
            for p in model.parameters():
                p.grad = None
        if self.kind == "lr":
            self._saved = [g["lr"] for g in optimizer.param_groups]
            for g in optimizer.param_groups:
                g["lr"] *= 0.5 if self.amount is None else self.amount

    def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
        if self._saved is not None:  # put the honest lr back before the recorder reads it
            for g, lr in zip(optimizer.param_groups, self._saved):
                g["lr"] = lr
            self._saved = None

    def on_step_end(self, args, state, control, model=None, **kw):
        if self.kind == "nudge" and state.global_step == self.step:
            with torch.no_grad():
                p = next(p for p in model.parameters() if p.requires_grad)
                p.add_(1e-4 if self.amount is None else self.amount)
        if self.kind == "drift" and state.global_step >= self.step:
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.mul_(1 + self.amount)


class SwapTrainer(transformers.Trainer):
    """Trains the micro-batches of steps ``a`` and ``a+1`` in swapped order."""

    swap_at = 5

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        step = self.state.global_step + 1
        if step == self.swap_at:
            first = super().get_batch_samples(epoch_iterator, num_batches, device)
            second = super().get_batch_samples(epoch_iterator, num_batches, device)
            self._held = first
            return second
        if step == self.swap_at + 1:
            return self._held
        return super().get_batch_samples(epoch_iterator, num_batches, device)


ANCHOR_EDITS = ("lr_zero", "lr_double", "weight_decay", "maximize", "betas", "moments", "one_moment")


class AnchorEdit(transformers.TrainerCallback):
    """A provider editing the optimizer / scheduler state at an anchor step, just before the
    recorder captures the anchor; training then goes on from the edited state, so every later step
    is consistent with it (issue 14: torch restored such edits on replay and the trace PASSed).
    List it *before* the AuditCallback. ``kind`` is one of :data:`ANCHOR_EDITS`."""

    def __init__(self, kind: str, step: int) -> None:
        if kind not in ANCHOR_EDITS:
            raise ValueError(kind)
        self.kind, self.step = kind, step

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
        if state.global_step != self.step:
            return
        opt = getattr(optimizer, "optimizer", optimizer)
        if self.kind in ("lr_zero", "lr_double"):  # the schedule's base too, or the scheduler would undo it
            f = 0.0 if self.kind == "lr_zero" else 2.0
            for g in opt.param_groups:
                g["lr"] *= f
                g["initial_lr"] *= f
            lr_scheduler.base_lrs = [b * f for b in lr_scheduler.base_lrs]
            lr_scheduler._last_lr = [g["lr"] for g in opt.param_groups]
        for g in opt.param_groups:
            if self.kind == "weight_decay":
                g["weight_decay"] = 0.0
            if self.kind == "maximize":
                g["maximize"] = True
            if self.kind == "betas":
                g["betas"] = (0.5, g["betas"][1])
        states = [opt.state[p] for g in opt.param_groups for p in g["params"] if p in opt.state]
        with torch.no_grad():
            if self.kind == "moments":
                for s in states:
                    s["exp_avg_sq"].mul_(1e6)
            if self.kind == "one_moment":
                states[0]["exp_avg"].zero_()
                states[0]["exp_avg_sq"].fill_(1.0)


class BoundDrift(transformers.TrainerCallback):
    """A bound-aware provider: after every step, move each trainable tensor ``p`` by
    ``per_step x |p|`` (relative L2, per tensor -- the verifier's own metric) in a ``direction``
    that is ``"random"`` (fresh each step) or ``"fixed"`` (drawn once per tensor). Its own
    generator: the run's RNG streams stay honest."""

    def __init__(self, per_step: float, direction: str = "random", seed: int = 0) -> None:
        if direction not in ("random", "fixed"):
            raise ValueError(direction)
        self.per_step, self.direction = per_step, direction
        self._gen = torch.Generator().manual_seed(seed)
        self._fixed: dict[str, torch.Tensor] = {}

    def _unit(self, name: str, p: torch.Tensor) -> torch.Tensor:
        if self.direction == "fixed" and name in self._fixed:
            return self._fixed[name]
        u = torch.randn(p.shape, generator=self._gen, dtype=torch.float64)
        u /= u.norm().clamp_min(1e-300)
        if self.direction == "fixed":
            self._fixed[name] = u
        return u

    def on_step_end(self, args, state, control, model=None, **kw):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    step = self._unit(name, p) * (self.per_step * float(p.detach().double().norm()))
                    p.add_(step.to(p.dtype))
