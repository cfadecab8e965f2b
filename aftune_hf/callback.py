"""AuditCallback: make any ``transformers.Trainer`` run auditable with one line.

Per optimizer step it commits the digests of the exact micro-batches fed to the model
(captured by a forward pre-hook), the loss, the learning rate applied, the gradient norm and
the digest of the trainable state after the step; it writes checkpoints of the trainable
tensors and anchors of the full resumable state (safetensors + JSON, never pickle) from a
background thread with a bounded queue. Any failure stops training (fail closed). Under
``accelerate launch`` (DDP) every rank captures its micro-batches and the main process alone
writes; one all-gather per step carries them, and a failure on any rank stops every rank.

Example:
    >>> from transformers import Trainer
    >>> from aftune_hf import AuditCallback
    >>> trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate,
    ...                   callbacks=[AuditCallback("contract.yaml", "runs/trace")])   # doctest: +SKIP
    >>> trainer.train()                                                               # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
from pathlib import Path
from typing import Any

import torch

from . import digest as D
from . import records as R
from .bgwriter import BackgroundWriter
from .contract import Contract, load_contract
from .dist import anchor_with_ranks, merge_steps, pack_step, rank_rng_bytes, sync_ranks
from .errors import ContractViolationError, RecorderError
from .live import (
    contract_differences, encoded_optimizer, make_anchor, on_host, rng_states, running_trainer, set_rng_states,
    sharded_parameters, trainable_params, unwrap,
)  # fmt: skip
from .observe import StepObserver
from .trace import ROOT, Anchor, Progress, TraceWriter, progress, schema_of
from .trainer_checkpoints import set_aside

logger = logging.getLogger(__name__)


class AuditCallback(StepObserver):
    """Record a Trainer run into an aftune trace that a client can later verify.

    Args:
        contract: the agreed job (a :class:`~aftune_hf.contract.Contract` or a YAML path).
        trace_dir: where the trace is written; resuming the Trainer resumes the trace.
        queue_size: pending background writes before a step waits (back-pressure).
        check_base_model: hash the live base weights against the contract at train begin.
        push_to_hub: a Hub repo id: push the trace after every anchor (in the background, never
            blocking a step; failures are logged) and once more when it is finished (a failure
            there raises :class:`~aftune_hf.errors.FetchError` after the trace is complete locally).
        hub_endpoint, hub_token, hub_private: passed to ``huggingface_hub``.
        signing_key: an Ed25519 private key (``aftune keygen``): sign the sealed root
            (``signature.dsse.json``, :mod:`aftune_hf.attest`), before any push.
        device_hash: compute the per-step state digest where the trainable tensors live
            (:mod:`aftune_hf.device_blake3`; the same digest), so a step that writes no checkpoint
            or anchor copies nothing to the host. Default: on when they are on a GPU.

    Example:
        >>> trainer = Trainer(..., callbacks=[AuditCallback("contract.yaml", "runs/trace")])  # doctest: +SKIP
    """

    def __init__(
        self,
        contract: Contract | str | Path,
        trace_dir: str | Path,
        *,
        queue_size: int = 2,
        check_base_model: bool = True,
        push_to_hub: str | None = None,
        hub_endpoint: str | None = None,
        hub_token: str | None = None,
        hub_private: bool = False,
        signing_key: str | Path | None = None,
        device_hash: bool | None = None,
    ) -> None:
        super().__init__()
        self.contract = contract if isinstance(contract, Contract) else load_contract(contract)
        self.trace_dir = Path(trace_dir)
        self.queue_size = queue_size
        self.check_base_model = check_base_model
        self.writer: TraceWriter | None = None
        self._bg: BackgroundWriter | None = None
        self._reads_done = threading.Event()
        self._reads_done.set()
        self.hub = dict(repo_id=push_to_hub, endpoint=hub_endpoint, token=hub_token, private=hub_private)
        self.signing_key = signing_key
        self.device_hash = device_hash
        if signing_key is not None:
            from .attest import public_key

            public_key(signing_key)  # a bad key fails now, not after training
        self._pusher: Any = None
        self._push_pending: Any = None
        self.push_result: Any = None
        self.root: dict[str, Any] | None = None
        self.rank, self.world, self._device = 0, 1, "cpu"
        self._rng_hold: dict[str, Any] | None = None
        self._bars = True
        self._shards: Any = None  # an FSDP2 run: this rank's RankShards
        self.cells: Any = None  # audit.layer_blocks: the CellTracker

    # -- lifecycle ---------------------------------------------------------------------------

    def on_init_end(self, args, state, control, **kwargs):
        # Before train() resolves resume_from_checkpoint=True to the newest checkpoint-N: move aside
        # the torn ones and those past the trace's last committed step (every process may do this).
        done = progress(self.trace_dir)
        ours = done.contract_digest == self.contract.digest_hex()
        if ours and 0 <= done.last_step < self.contract.training.max_steps and not done.sealed:
            set_aside(args.output_dir, done.last_step)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                       train_dataloader=None, **kwargs):  # fmt: skip
        with self._abort_on_error():
            self._begin(args, state, model, optimizer, lr_scheduler, train_dataloader)
        self._rng_hold = rng_states()  # what step 1 consumes, even after an eval_on_start

    def _begin(self, args, state, model, optimizer, lr_scheduler, train_dataloader) -> None:
        # Multi-process (DDP under accelerate launch / torchrun): every rank checks the contract and
        # captures its own micro-batches; the main process alone writes. Each sync point gathers
        # every rank's status, so a failure on any rank stops all of them at the same step.
        self.rank, self.world, self._device = args.process_index, args.world_size, args.device
        self._bars = not args.disable_tqdm
        with self._failing_together():
            if sharded_parameters(model) or self.contract.shards > 1:
                from .rank_shards import RankShards

                self._shards = RankShards.for_run(self.contract, trainable_params(model), self.trace_dir, self.rank, self.world)
            diffs = contract_differences(
                self.contract, args, model, train_dataloader,
                check_base=self.check_base_model and self.rank == 0 and (state.global_step == 0 or self.contract.is_peft)
                and self._shards is None,  # no process holds the sharded base weights (the verifier checks step 0)
                trainer=running_trainer(),
            )  # fmt: skip
            if diffs:
                raise ContractViolationError(
                    "contract_mismatch", "refusing to record; the run differs from the contract:\n  " + "\n  ".join(diffs)
                )
            rng = rank_rng_bytes(self.world)
        rngs = self._sync(rng)
        with self._failing_together():
            if self.rank == 0:
                self._open_trace(state, model, optimizer, lr_scheduler, rngs)
        self._sync()
        if self._shards is not None:
            self._begin_sharded(state, model, optimizer, lr_scheduler, rngs)
        self.capture.install(unwrap(model))
        if self.contract.audit.layer_blocks is not None:
            from .cells.track import CellTracker

            self.cells = CellTracker(self.contract.audit.layer_blocks)
            self.cells.install(unwrap(model), running_trainer())

    def _stop_capture(self) -> None:
        self.capture.remove()
        if self.cells is not None:
            self.cells.remove()

    def _begin_sharded(self, state, model, optimizer, lr_scheduler, rngs: list[bytes]) -> None:
        """Step 0 of an FSDP run: every rank writes its anchor shards; the main process joins their
        digests into the anchor and the start record."""
        with self._failing_together():
            mine = self._shards.step(0, trainable_params(model), checkpoint=False,
                                     optimizer=encoded_optimizer(model, optimizer)[0])  # fmt: skip
        parts = self._sync(mine)
        with self._failing_together():
            if self.rank == 0:
                sections, _ = self._shards.split(parts)
                params_state, optimizer_state = self._shards.join(sections, self._shards.full)
                anchor = anchor_with_ranks(make_anchor(0, model, optimizer, lr_scheduler, state, copy=False), rngs)
                anchor = dataclasses.replace(anchor, params={}, optimizer={}, params_state=params_state,
                                             optimizer_state=optimizer_state)  # fmt: skip
                self.writer.append(R.start_record(state=params_state, anchor=self.writer.write_anchor(anchor)))
        self._sync()

    def _open_trace(self, state, model, optimizer, lr_scheduler, rngs: list[bytes]) -> None:
        done = progress(self.trace_dir)
        if done.contract_digest not in (None, self.contract.digest_hex()):
            raise ContractViolationError("contract_mismatch", "the trace was recorded under another contract",
                                         path=str(self.trace_dir))  # fmt: skip
        if done.sealed or done.last_step >= self.contract.training.max_steps:
            self._refuse_finished(done)
        params = trainable_params(model)
        if done.last_step >= 0 and self._shards is not None:
            raise RecorderError("unsupported_sharding", "resuming an FSDP trace is not built yet (docs/SCALING.md); "
                                "record the job again into a new trace directory", path=str(self.trace_dir))  # fmt: skip
        if done.last_step >= 0:  # a restart from scratch (global_step 0) resumes it at step 0
            self.writer = self._resume_writer(state.global_step, params)
        elif state.global_step > 0:
            raise RecorderError("resume_gap", f"the Trainer resumed at step {state.global_step} but the trace has no "
                                "committed step; resume with the trace it was recorded into", path=str(self.trace_dir))  # fmt: skip
        else:
            self.writer = TraceWriter.create(
                self.trace_dir, contract_digest=self.contract.digest(), contract=self.contract.canonical(),
                schema=schema_of(params),
            )  # fmt: skip
            if self._shards is None:  # an FSDP run writes step 0 once every rank has (_begin_sharded)
                anchor = anchor_with_ranks(make_anchor(0, model, optimizer, lr_scheduler, state), rngs)
                a0 = self.writer.write_anchor(anchor)
                self.writer.append(R.start_record(state=D.state_digest(params), anchor=a0))
        if self._hash_on_device(params) and self._shards is None:
            from .device_blake3 import prepare

            prepare(next(iter(params.values())).device)  # compile and self-check now, not inside step 1
        self._bg = BackgroundWriter(self.queue_size)

    def _refuse_finished(self, done: Progress) -> None:
        """A job whose steps are all committed is never recorded again: seal it if a crash stopped
        finalisation (and push it, if asked), then refuse before the Trainer runs another step."""
        state = "sealed" if done.sealed else "now sealed (a crash had stopped its finalisation)"
        if not done.sealed:
            writer = TraceWriter.resume(self.trace_dir)
            try:
                self.root = writer.seal(progress=self._bars)
            finally:
                writer.close()
            logger.warning("aftune: sealed the trace a crash left unfinished, root %s", self.root["trace_root"])
        else:  # a kill after root.json but before the lock's release leaves the lock file: remove it
            TraceWriter.clear_stale_lock(self.trace_dir)
            self.root = json.loads((self.trace_dir / ROOT).read_text(encoding="utf-8"))
        self._sign()
        if self.hub["repo_id"]:
            self.push_result = self._push(progress=self._bars)
        raise RecorderError(
            "trace_finished", f"all {self.contract.training.max_steps} steps of this trace are committed and it is "
            f"{state} (root {self.root['trace_root'][:16]}…); nothing is left to record and no step was run. "
            "Record a new run into a new trace directory", path=str(self.trace_dir),
        )  # fmt: skip

    def _sync(self, payload: bytes = b"", error: BaseException | None = None) -> list[bytes]:
        return sync_ranks(payload, error, world=self.world, device=self._device)

    @contextlib.contextmanager
    def _failing_together(self):
        """A rank-local block: if it fails, tell the other ranks at the sync they wait in, then raise."""
        try:
            yield
        except BaseException as e:
            self._sync(error=e)
            raise

    def _resume_writer(self, step: int, params: dict[str, torch.Tensor]) -> TraceWriter:
        writer = TraceWriter.resume(self.trace_dir)
        if writer.header["contract_digest"] != self.contract.digest_hex():
            writer.close()
            raise ContractViolationError("contract_mismatch", "the trace was recorded under another contract")
        writer.truncate_after(step)
        if writer.record_for(step)["state"] != D.state_digest(params).hex():
            writer.close()
            raise RecorderError(
                "resume_mismatch", "the weights resumed from are not the committed state of that step", step=step
            )
        writer.append(R.resume_record(step=step, reason="trainer resumed from checkpoint"))
        logger.info("aftune: resumed trace at step %d", step)
        return writer

    def on_evaluate(self, args, state, control, **kwargs):
        # Evaluation between two steps draws from the global RNG (creating a DataLoader iterator does);
        # the next training step must consume the RNG the last anchor committed, as a replay does.
        if self._rng_hold is not None:
            set_rng_states(self._rng_hold)
        self._flush()  # save_strategy="best" decides to save only now

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save:  # save_strategy="epoch": the checkpoint must not be ahead of the chain
            self._flush()

    def _flush(self) -> None:
        if self._bg is not None:
            with self._abort_on_error():
                self._bg.flush()

    def on_step_begin(self, args, state, control, **kwargs):
        self._rng_hold = None
        if self.world == 1:  # with several processes the check runs at the step-end sync
            with self._abort_on_error():
                self._check_bg()
        super().on_step_begin(args, state, control, **kwargs)
        if self.cells is not None:
            self.cells.begin()

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        with self._abort_on_error():
            self._step_end(state, control, model, optimizer, lr_scheduler)

    def _step_end(self, state, control, model, optimizer, lr_scheduler) -> None:
        # Everything small is captured now; the trainable tensors and optimizer state are read
        # by the writer thread *in place* while the next step's forward/backward runs (they do
        # not change until its optimizer.step, where on_pre_optimizer_step waits for the reads).
        audit, step = self.contract.audit, state.global_step
        last = step == self.contract.training.max_steps
        anchored = step % audit.anchor_every == 0 or last
        checkpoint = step % audit.checkpoint_every == 0 or last
        self._rng_hold = rng_states()
        with self._failing_together():
            self._check_bg()
            fields, params = self.observe(state, model, state_digest=False)
            optim = None
            if self.cells is not None:  # one process only (the contract refuses cells with several)
                from .cells.track import optimizer_tensors, table_digest

                fields["cells"] = table_digest(self.cells.end())
                optim = optimizer_tensors(model, optimizer)  # live, where they are: hashed by the writer thread
            mine = pack_step(fields)
            if self._shards is not None:  # FSDP: this rank's files are written now, its pieces go to the main process
                opt = encoded_optimizer(model, optimizer)[0] if anchored else None
                mine += self._shards.step(step, params, checkpoint=checkpoint, optimizer=opt)
            mine += rank_rng_bytes(self.world) if anchored else b""
        parts = self._sync(mine)
        if self.rank != 0:
            return
        rngs: list[bytes] = []
        if self.world > 1:  # every rank's micro-batches, rank order; the loss summed over ranks
            fields, rngs = merge_steps(fields, parts)
        sharded = None
        if self._shards is not None:
            sections, rngs = self._shards.split(rngs)
            sharded = (sections, dict(self._shards.full))  # step() replaces its entries, never edits them
        anchor = None
        if anchored:
            anchor = anchor_with_ranks(make_anchor(step, model, optimizer, lr_scheduler, state, copy=False), rngs)
        self._reads_done.clear()
        self._bg.submit(lambda: self._commit(fields, params, checkpoint, anchor, sharded, optim))
        if control.should_save or last:
            self._bg.flush()  # the Trainer checkpoint must never be ahead of the chain (see also on_init_end)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        super().on_pre_optimizer_step(args, state, control, model=model, **kwargs)
        if self._bg is None:  # not the writing process
            return
        with self._abort_on_error():
            while not self._reads_done.wait(timeout=1.0):
                self._check_bg()  # a failed job never sets the event
            self._check_bg()

    def _commit(self, fields: dict[str, Any], params: dict, checkpoint: bool, anchor: Anchor | None,
                sharded: tuple | None = None, optim: dict | None = None) -> None:  # fmt: skip
        staged: list = []
        try:  # phase 1 reads the live tensors: hash them, write them to temp files
            if optim is not None:  # cells: the optimizer state after the step, read before the next step changes it
                from .cells.track import optimizer_digest

                fields = {**fields, "optim": optimizer_digest(optim)}
            if sharded is not None:  # FSDP: the ranks wrote their files; join their digests
                self._reads_done.set()
                state, optimizer_state = self._shards.join(*sharded)
                if anchor is not None:
                    anchor = dataclasses.replace(anchor, params={}, optimizer={}, params_state=state,
                                                 optimizer_state=optimizer_state)  # fmt: skip
            elif not checkpoint and anchor is None and self._hash_on_device(params):
                from .device_blake3 import state_digest  # only 32 bytes per tensor leave the device

                state = state_digest(params)
            else:
                params, copied = on_host(params)  # on a GPU: one copy to the CPU, then training may go on
                optimizer = None
                if anchor is not None:
                    optimizer, optimizer_copied = on_host(anchor.optimizer)
                    copied = copied or optimizer_copied
                if copied:
                    self._reads_done.set()
                state = D.state_digest(params)
            fields = {**fields, "state": state, "checkpoint": checkpoint}
            if checkpoint and sharded is None:
                staged += self.writer.stage_checkpoint(fields["step"], params)
            digest = None
            if anchor is not None and sharded is None:  # its params are the tensors hashed just above: hashed once
                anchor = dataclasses.replace(anchor, params=params, optimizer=optimizer, params_state=fields["state"])
            if anchor is not None:
                digest, files = self.writer.stage_anchor(anchor)
                staged += files
        except BaseException:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            raise
        finally:
            self._reads_done.set()  # training may now run its next optimizer step
        self.writer.commit_files(staged)  # phase 2: durable, visible, then the commit point
        self.writer.append(R.step_record(**fields, anchor=digest))
        if digest is not None and self.hub["repo_id"]:
            self._push_in_background()

    def _hash_on_device(self, params: dict) -> bool:
        if self.device_hash is not None:
            return self.device_hash
        return any(t.device.type == "cuda" for t in params.values())

    def _push(self, progress: bool = False) -> Any:
        from .hub import push_trace

        h = self.hub
        return push_trace(self.trace_dir, h["repo_id"], private=h["private"], endpoint=h["endpoint"], token=h["token"],
                          progress=progress)  # fmt: skip

    def _push_in_background(self) -> None:
        """Push the trace so far; skipped while a previous push is still running."""
        import concurrent.futures

        if self._push_pending is not None and not self._push_pending.done():
            return
        if self._pusher is None:
            self._pusher = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="aftune-push")
        self._push_pending = self._pusher.submit(self._push)
        self._push_pending.add_done_callback(
            lambda f: f.exception() and logger.warning("aftune: background push failed (training goes on): %s", f.exception())
        )  # fmt: skip

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._stop_capture()
        if self._bg is None or self.writer is None:
            return
        try:
            with self._abort_on_error():
                self._bg.flush()
                if state.global_step == self.contract.training.max_steps:
                    self.root = self.writer.seal(progress=self._bars)  # a failure here: running again seals it
                    self._sign()
                    logger.info("aftune: trace %s finalized, root %s", self.trace_dir, self.root["trace_root"])
        finally:
            if self._bg is not None:
                self._bg.close()
                self._bg = None
            self.writer.close()
        if self.root is None:
            logger.warning("aftune: training stopped at step %d of %d; trace left open for resume",
                           state.global_step, self.contract.training.max_steps)  # fmt: skip
        elif self.hub["repo_id"]:
            if self._pusher is not None:
                self._pusher.shutdown(wait=True)
            self.push_result = self._push(progress=self._bars)  # FetchError here: the local trace is complete; retry `aftune push`
            logger.info("aftune: pushed %s", self.push_result.uri)

    def _sign(self) -> None:
        from .attest import sign_root
        from .trace import SIGNATURE

        if self.signing_key is not None and not (self.trace_dir / SIGNATURE).is_file():
            sign_root(self.trace_dir, self.signing_key)

    def _check_bg(self) -> None:
        if self._bg is not None:
            self._bg.raise_if_failed()

    @contextlib.contextmanager
    def _abort_on_error(self):
        """Fail closed: on any error stop capturing, stop the writer, release the trace lock."""
        try:
            yield
        except BaseException:
            self._stop_capture()
            if self._bg is not None:
                self._bg.close()
                self._bg = None
            if self.writer is not None:
                self.writer.close()
            raise
