"""Re-execute a step window through the Trainer itself; return measurements, no verdicts.

The client's recipe builds a fresh Trainer from the client's contract and dataset. For a
window ``(start, end]`` with ``start > 0`` the anchor at ``start`` (already parsed by the strict
reader: safetensors + JSON) is materialised as a private Trainer checkpoint written by this
process (``optimizer.pt`` etc. are *our* serialisations of decoded tensors; nothing from the
trace is unpickled), the Trainer resumes from it with ``resume_from_checkpoint`` and is stopped
after step ``end`` through ``control.should_training_stop`` -- ``max_steps`` is unchanged, so
the LR schedule is the original one. A :class:`ReplayObserver` observes each step exactly as
the recorder did.

Example:
    >>> steps = replay_window(contract, 4, 8, reader.anchor(4, schema), workdir)   # doctest: +SKIP
    >>> [s.fields["step"] for s in steps]                                          # doctest: +SKIP
    [5, 6, 7, 8]
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import digest as D
from .observe import StepObserver
from .contract import Contract, Recipe, load_recipe
from .dist import OTHER_ERROR, PROVIDER_FAULT, all_gather_bytes, anchor_with_ranks, exchange, merge_steps, pack_step, rank_rng_bytes
from .errors import ReplayMismatchError, VerifierEnvironmentError
from .live import make_anchor, snapshot, trainable_params, unwrap
from .statecodec import decode_optimizer, from_json_value, optimizer_param_names, to_json_value
from .trace import Anchor, check_schema, schema_of

if TYPE_CHECKING:
    from .verify.derive import Expected


@dataclass(frozen=True)
class Replay:
    """A re-executed window: the trainable-state digest it started from, every step, and the full
    state (as an :class:`Anchor`) at its start (step 0 only: the recipe's initial state) and end."""

    initial_state: bytes
    steps: list[ReplayedStep]
    start: Anchor | None
    end: Anchor | None
    opened: dict[int, Any] = dataclasses.field(default_factory=dict)  # cells: step -> its regenerated tensors


@dataclass(frozen=True)
class ReplayedStep:
    """What one re-executed step produced: record fields (as the recorder makes them) and tensors."""

    fields: dict[str, Any]
    params: dict[str, torch.Tensor] | None
    seconds: float = 0.0  # wall time from step begin to step end


class ReplayObserver(StepObserver):
    """Observe steps ``start+1 .. end``, then stop the Trainer."""

    def __init__(self, start: int, end: int, keep_params: bool, gather: bool = False, sharded: bool = False,
                 cells: Any = None) -> None:  # fmt: skip
        super().__init__()
        self.cells = cells  # a cells.track.CellTracker or cells.opening.Regenerate: cell tables, as the recorder's
        self.start, self.end = start, end
        self.keep_params = keep_params
        self.gather = gather  # a multi-process replay: merge every rank's share as the recorder did
        self.sharded = sharded  # an FSDP2 replay: digests joined from every rank's shard pieces
        self.steps: list[ReplayedStep] = []
        self.initial_state: bytes | None = None
        self.start_state: Anchor | None = None
        self.end_state: Anchor | None = None
        self._t0 = 0.0

    def _state(self, tensors: dict[str, torch.Tensor], args: Any) -> bytes:
        if not self.sharded:
            return D.state_digest(tensors)
        from .rank_shards import sharded_state_digest

        return sharded_state_digest(tensors, args.process_index, args.world_size, args.device)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        self.initial_state = self._state(trainable_params(model), args)
        if self.start == 0:  # the contract's full initial state, as the recorder's step-0 anchor holds it
            self.start_state = self._full_state(0, model, optimizer, lr_scheduler, state, args)
        self.capture.install(unwrap(model))
        if self.cells is not None:
            from .live import running_trainer

            self.cells.install(unwrap(model), running_trainer())

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._t0 = time.perf_counter()
        super().on_step_begin(args, state, control, **kwargs)
        if self.cells is not None:
            self.cells.step_begin(state.global_step + 1, model, optimizer)

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        fields, params = self.observe(state, model, state_digest=not self.sharded)
        if self.cells is not None:
            fields.update(self.cells.step_end(state.global_step, model, optimizer))
        if self.sharded:
            fields["state"] = self._state(params, args)
        if self.gather:
            fields, _ = merge_steps(fields, all_gather_bytes(pack_step(fields), args.device))
        seconds = time.perf_counter() - self._t0
        self.steps.append(ReplayedStep(fields, snapshot(params) if self.keep_params else None, seconds))
        if state.global_step >= self.end:
            self.end_state = self._full_state(state.global_step, model, optimizer, lr_scheduler, state, args)
            control.should_training_stop = True

    def _full_state(self, step: int, model, optimizer, lr_scheduler, state, args) -> Anchor:
        """What the recorder's anchor at ``step`` holds, taken the way the recorder takes it."""
        anchor = make_anchor(step, model, optimizer, lr_scheduler, state, copy=not self.sharded)
        if self.sharded:  # compared by digest (exact mode): no process gathers a whole tensor
            anchor = dataclasses.replace(anchor, params={}, optimizer={}, params_state=self._state(dict(anchor.params), args),
                                         optimizer_state=self._state(dict(anchor.optimizer), args))  # fmt: skip
        if self.gather:  # every rank's RNG, as the recorder's main process gathers them
            anchor = anchor_with_ranks(anchor, all_gather_bytes(rank_rng_bytes(args.world_size), args.device))
        return anchor

    def on_train_end(self, args, state, control, **kwargs):
        self.capture.remove()
        if self.cells is not None:
            self.cells.remove()


def build_recipe(contract: Contract, output_dir: Path, *, distributed: bool = False) -> Recipe:
    """The client's recipe, with the Trainer kept quiet and from saving anything. A multi-process
    contract is built as its one-process equivalent (:meth:`Contract.single_process`) unless
    ``distributed`` (this process is one of ``world_size`` launched to replay it as recorded)."""
    c = contract if distributed else contract.single_process()
    extra = {"use_cpu": True} if distributed and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") else {}
    return load_recipe(c)(c, str(output_dir), save_strategy="no", disable_tqdm=True, logging_strategy="no",
                          report_to="none", eval_strategy="no", **extra)  # fmt: skip


class RanksAsOneTrainer:
    """Mixin for a one-process Trainer that stands in for ``world_size`` data-parallel processes.

    The batches come from accelerate's own sharding (``prepare_data_loader`` with
    ``num_processes=world_size`` and each ``process_index``, with this Trainer's accelerator
    settings), interleaved round-robin into one batch sampler: with ``GA x world_size``
    micro-batches per step a step holds exactly what every rank trained on, epoch-end padding
    (``even_batches``) included, and resuming skips batches as the Trainer always does.
    """

    world_size = 1

    def get_train_dataloader(self):  # noqa: D102 - see the class docstring
        if self.world_size == 1:
            return super().get_train_dataloader()
        from accelerate.data_loader import prepare_data_loader
        from torch.utils.data import DataLoader

        acc, prepare = self.accelerator, self.accelerator.prepare

        def as_ranks(loader: DataLoader) -> Any:
            shards = [prepare_data_loader(
                loader, acc.device, num_processes=self.world_size, process_index=r, split_batches=acc.split_batches,
                put_on_device=False, rng_types=acc.rng_types.copy(), dispatch_batches=acc.dispatch_batches,
                even_batches=acc.even_batches, use_seedable_sampler=acc.use_seedable_sampler,
                data_seed=acc.dataloader_config.data_seed, non_blocking=acc.non_blocking,
                use_stateful_dataloader=acc.use_stateful_dataloader) for r in range(self.world_size)]  # fmt: skip
            merged = DataLoader(loader.dataset, batch_sampler=InterleavedBatches(shards), collate_fn=loader.collate_fn,
                                num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                                worker_init_fn=loader.worker_init_fn)  # fmt: skip
            return prepare(merged)  # the usual one-process preparation (device placement, skipping)

        acc.prepare = as_ranks  # the Trainer builds its DataLoader, then hands it to accelerator.prepare
        try:
            return super().get_train_dataloader()
        finally:
            del acc.prepare


class InterleavedBatches:
    """Batch indices of several ranks' sharded dataloaders: rank 0's next batch, rank 1's, ..."""

    def __init__(self, shards: list[Any]) -> None:
        self.shards = shards

    def __len__(self) -> int:
        return len(self.shards) * min(len(s.batch_sampler) for s in self.shards)

    def __iter__(self) -> Iterator[list[int]]:
        for batches in zip(*(s.batch_sampler for s in self.shards)):
            yield from batches

    def set_epoch(self, epoch: int) -> None:
        for s in self.shards:
            s.set_epoch(epoch)


def make_trainer(contract: Contract, parts: Recipe, *, distributed: bool = False, **kwargs: Any) -> Any:
    """The contract's Trainer class for a replay or data check: one process standing in for the
    contract's ranks, unless ``distributed`` (this process is one of them) or there is one rank."""
    from .recipes.common import trainer_class

    base = trainer_class(contract)
    if distributed and contract.shards > 1:
        return type("ShardedReplayTrainer", (ShardedResume, base), {})(**parts.trainer_kwargs(), **kwargs)
    if distributed or contract.training.world_size == 1:
        return base(**parts.trainer_kwargs(), **kwargs)
    cls = type("ReplayTrainer", (RanksAsOneTrainer, base), {"world_size": contract.training.world_size})
    return cls(**parts.trainer_kwargs(), **kwargs)


class ShardedResume:
    """Mixin for the Trainer of an FSDP2 replay (every process one of the recorded ranks): resume
    from :func:`materialize_checkpoint`'s files, not from the FSDP checkpoint formats the Trainer
    would look for. The weights were copied in before the model was sharded (FSDP2 then cuts every
    rank's rows from them, as the recorded run's); the optimizer state is cut into each parameter's
    ``DTensor`` shard here (:func:`shard_like`); the scheduler loads as usual.
    """

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:  # noqa: D102
        return None  # the weights are in place (materialize_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:  # noqa: D102
        if checkpoint is None:
            return
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        saved = torch.load(Path(checkpoint) / "optimizer.pt", weights_only=True)  # written by this process
        params = [p for g in inner.param_groups for p in g["params"]]
        state = {i: {k: shard_like(v, params[i]) for k, v in s.items()} for i, s in saved["state"].items()}
        inner.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / "scheduler.pt", weights_only=True))


def shard_like(value: Any, param: Any) -> Any:
    """A whole optimizer-state tensor as this rank's dim-0 ``DTensor`` shard of it on ``param``'s mesh:
    how the recorder took it (every recorded state tensor with a dimension is such a shard, e.g.
    Adam's moments, shaped as the parameter, or a factored row statistic); a 0-dim value (a step
    counter) or a plain parameter's value as it is."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor) or not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    from .sharded_digest import shard_rows

    mesh = param.device_mesh
    a, b = shard_rows(int(value.shape[0]), mesh.size(), mesh.get_local_rank())
    local = value[a:b].to(param.device, copy=True).contiguous()
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=value.shape,
                              stride=torch.empty(value.shape, device="meta").stride())  # fmt: skip


def by_rank(batches: list[bytes], world_size: int) -> list[list[bytes]]:
    """A one-process step's micro-batches regrouped as the ranks of a ``world_size``-process run saw
    them: rank ``r`` had micro-batches ``r, r + W, r + 2W, ...`` (accelerate shards batches round-robin)."""
    return [batches[r::world_size] for r in range(world_size)]


_DEVICE_RNG = ("cuda", "npu", "hpu", "mlu", "musa", "xpu")


def trainer_rng(states: dict[str, Any], distributed: bool) -> dict[str, Any]:
    """An anchor's RNG states in the shape ``Trainer._load_rng_state`` expects. The recorder keeps
    every visible accelerator's generator (a list); a process that is not distributed restores
    only its own device's (one tensor), a distributed one restores the list."""
    out = dict(states)
    for key in _DEVICE_RNG:
        value = out.get(key)
        if isinstance(value, list) and not distributed and value:
            module = getattr(torch, key, None)
            index = module.current_device() if module is not None and module.is_available() else 0
            out[key] = value[index if index < len(value) else 0]
        elif isinstance(value, torch.Tensor) and distributed:
            out[key] = [value]
    return out


def materialize_checkpoint(trainer: Any, anchor: Anchor, ckpt: Path, expected: Expected) -> None:
    """Write a Trainer ``checkpoint-N`` directory (our own files only): the optimizer's options, the
    scheduler and the trainer counters from the contract (``expected``); from the anchor only what
    cannot be derived -- trainable tensors, per-parameter optimizer state, RNG."""
    model = unwrap(trainer.model)
    params = trainable_params(model)
    check_schema(anchor.params, schema_of(params), path=f"anchors/step-{anchor.step:08d}/params.safetensors")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(anchor.params[name])
    ckpt.mkdir(parents=True, exist_ok=True)
    model.should_save_on_this_rank = lambda is_main_process: True  # a DDP replay: every process needs its copy
    try:
        model.save_pretrained(ckpt)
    finally:
        del model.should_save_on_this_rank
    trainer.create_optimizer()
    names = optimizer_param_names(getattr(trainer.optimizer, "optimizer", trainer.optimizer), model)
    groups = anchor.meta["optimizer"].get("param_groups") if isinstance(anchor.meta.get("optimizer"), dict) else None
    recorded = [n for g in groups or [] if isinstance(g, dict) for n in g.get("params", [])]
    if recorded != names:
        raise ReplayMismatchError("optimizer_mismatch", "anchor optimizer groups differ from the recipe's", step=anchor.step)
    carried = anchor.optimizer_state_dict()["state"]
    derived = decode_optimizer({}, {"param_groups": expected.groups[anchor.step], "scalars": to_json_value({})})
    torch.save({"state": carried, "param_groups": derived["param_groups"]}, ckpt / "optimizer.pt")
    torch.save(from_json_value(expected.scheduler[anchor.step]), ckpt / "scheduler.pt")
    from transformers.training_args import ParallelMode

    distributed = trainer.args.parallel_mode == ParallelMode.DISTRIBUTED
    if anchor.world_size == 1:
        torch.save(trainer_rng(anchor.rng_state(), distributed), ckpt / "rng_state.pth")
    else:  # what the Trainer saves and loads per process
        for rank in range(anchor.world_size):
            torch.save(trainer_rng(anchor.rng_state(rank), distributed), ckpt / f"rng_state_{rank}.pth")
    state = {"global_step": anchor.step, "max_steps": trainer.args.max_steps, "train_batch_size": expected.train_batch_size}
    (ckpt / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")


def replay_window(
    contract: Contract,
    start: int,
    end: int,
    anchor: Anchor | None,
    workdir: Path,
    expected: Expected,
    *,
    keep_params: bool = False,
    distributed: bool = False,
    cells: Any = None,
) -> Replay:
    """Re-execute steps ``start+1 .. end`` from the anchor at ``start``; ``expected`` is the
    contract's derivable state (:func:`aftune_hf.verify.derive.derive_expected`).

    ``anchor`` is required for ``start > 0``; ``start == 0`` trains from the recipe's initial state.
    ``distributed``: every process of a ``world_size`` launch calls this together (DDP replay; each
    gets every rank's micro-batches in its steps' fields); ``workdir`` must differ per process.
    """
    import transformers

    workdir.mkdir(parents=True, exist_ok=True)
    parts = build_recipe(contract, workdir / "out", distributed=distributed)
    observer = ReplayObserver(start, end, keep_params, gather=distributed, sharded=distributed and contract.shards > 1,
                              cells=cells)  # fmt: skip
    trainer = make_trainer(contract, parts, distributed=distributed, callbacks=[observer])
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    resume = None
    if start > 0 and anchor is None:
        raise ValueError("a window starting after step 0 needs its anchor")
    try:
        if start > 0:
            resume = workdir / f"checkpoint-{start}"
            materialize_checkpoint(trainer, anchor, resume, expected)
    except BaseException as e:
        if distributed:  # the other processes must not start a DDP run this one will not join
            _agree(trainer, e)
        raise
    if distributed:
        _agree(trainer, None)
    with _quiet():
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if observer.initial_state is None:  # pragma: no cover - Trainer always calls on_train_begin
        raise RuntimeError("the Trainer did not start")
    opened = getattr(cells, "opened", {})
    return Replay(observer.initial_state, observer.steps, observer.start_state, observer.end_state, opened)


def _agree(trainer: Any, error: BaseException | None) -> None:
    """All processes of a DDP replay say whether they could start the window; if one could not,
    the others raise too (a provider fault if that one's was, else an environment error)."""
    _, statuses = exchange(b"", error, world=trainer.args.world_size, device=trainer.args.device)
    if error is None and PROVIDER_FAULT in statuses:
        raise ReplayMismatchError("replay_failed", "another process could not start this window from its anchor")
    if error is None and OTHER_ERROR in statuses:
        raise VerifierEnvironmentError("replay_failed", "another process of this verification failed")


class _quiet:
    """Silence transformers' info logging during a replay."""

    def __enter__(self) -> None:
        import transformers

        self._level = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()

    def __exit__(self, *exc: Any) -> None:
        import transformers

        transformers.logging.set_verbosity(self._level)


def sanitized_env() -> dict[str, str]:
    """The environment without the variables that make a Trainer join a process group."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "GROUP_RANK", "ROLE_RANK", "ACCELERATE_USE_CPU", "TORCHELASTIC_RUN_ID"}  # fmt: skip
    return {k: v for k, v in os.environ.items() if k not in drop}



