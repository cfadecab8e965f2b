"""The all-steps data check's source: every step's micro-batches from the client's data pipeline alone.

The Trainer's own dataloader, epoch seeding and ``get_batch_samples`` grouping give the batches;
its own ``compute_loss``, stopped by a forward pre-hook at the model call, gives what the model
would be fed (a trainer such as ``trl.SFTTrainer`` adds inputs there). No forward pass runs.

Example:
    >>> for step, digests, num_items in iter_data_steps(contract, workdir):   # doctest: +SKIP
    ...     ...
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..contract import Contract
from ..errors import ReplayMismatchError
from ..live import unwrap
from ..replay import build_recipe, by_rank, make_trainer


def iter_data_steps(contract: Contract, workdir: Path) -> Iterator[tuple[int, list[list[bytes]], int | None]]:
    """Yield ``(step, micro-batch digests per rank, num_items)`` for every step, from the data pipeline only.

    Uses the Trainer's own dataloader, epoch seeding and ``get_batch_samples`` grouping
    (gradient accumulation, short last step of an epoch), and its own ``compute_loss`` up to the
    model call (a trainer such as ``trl.SFTTrainer`` adds inputs there): each micro-batch's digest
    is of what the model would be fed; the forward pass itself is never run.
    """
    parts = build_recipe(contract, workdir / "data")
    trainer = make_trainer(contract, parts)
    loader = trainer.get_train_dataloader()
    (epochs, per_epoch, _, _, _, steps_in_epoch, max_steps) = trainer.set_initial_training_values(trainer.args, loader)
    ga = trainer.args.gradient_accumulation_steps
    feed = _FeedProbe(trainer)
    step = 0
    try:
        for epoch in range(int(epochs)):
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            iterator = iter(loader)
            remainder = steps_in_epoch % ga or ga
            for update in range(per_epoch):
                if step >= max_steps:
                    return
                n = ga if update != per_epoch - 1 else remainder
                batches, num_items = trainer.get_batch_samples(iterator, n, trainer.args.device)
                step += 1
                fed = [feed(b, num_items) for b in batches]
                digests = by_rank([d for d, _ in fed], contract.training.world_size)
                yield step, digests, fed[-1][1]  # the recorder keeps the step's last call's count
    finally:
        feed.close()


class _Fed(BaseException):
    """Raised from the model's forward pre-hook: the call's inputs, the forward not run (a
    ``BaseException``, so that a trainer's ``except Exception`` around its model call lets it through)."""

    def __init__(self, digest: bytes, num_items: int | None) -> None:
        super().__init__("fed")
        self.digest, self.num_items = digest, num_items


class _FeedProbe:
    """What the Trainer's ``compute_loss`` would feed the model for one micro-batch (stopped at the call)."""

    def __init__(self, trainer: Any) -> None:
        from ..observe import fed_digest

        def stop(module: Any, args: tuple, kwargs: dict) -> None:
            if torch.is_grad_enabled():
                raise _Fed(*fed_digest(args, kwargs))

        self.trainer = trainer
        self.model = unwrap(trainer.model)
        self.model.train()
        self.handle = self.model.register_forward_pre_hook(stop, with_kwargs=True)

    def __call__(self, batch: Any, num_items: Any) -> tuple[bytes, int | None]:
        t = self.trainer
        inputs = t._prepare_inputs(batch)
        try:
            with t.compute_loss_context_manager():
                t.compute_loss(t.model, inputs, num_items_in_batch=num_items)
        except _Fed as fed:
            return fed.digest, fed.num_items
        raise ReplayMismatchError("data_pipeline", "the trainer's compute_loss did not call the model")

    def close(self) -> None:
        self.handle.remove()
