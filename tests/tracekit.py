"""A small, real training loop that writes a complete trace without the Trainer.

Used by the format tests: a linear model with dropout, AdamW and a LambdaLR schedule,
recorded step by step with TraceWriter, anchors re-encoded through statecodec.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from aftune_hf import digest as D
from aftune_hf import records as R
from aftune_hf.statecodec import encode_optimizer, encode_rng, to_json_value
from aftune_hf.trace import Anchor, TraceWriter, schema_of

CONTRACT_DIGEST = bytes(range(32))


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.head = torch.nn.Linear(3, 2)
        self.drop = torch.nn.Dropout(0.2)

    def forward(self, x):
        return self.head(self.drop(torch.tanh(self.lin(x))))


def build(seed: int = 0):
    torch.manual_seed(seed)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return {"x": torch.randn(5, 4, generator=g), "y": torch.randn(5, 2, generator=g)}


def train_step(model, opt, sched, step: int) -> float:
    b = batch(step)
    loss = torch.nn.functional.mse_loss(model(b["x"]), b["y"])
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    return float(loss.detach())


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}


def anchor_of(step: int, model, opt, sched) -> Anchor:
    names = [n for n, _ in model.named_parameters()]
    opt_t, opt_meta = encode_optimizer(opt.state_dict(), names)
    rng_t, rng_meta = encode_rng(rng_states())
    meta = {"step": step, "optimizer": opt_meta, "scheduler": to_json_value(sched.state_dict()),
            "rng": rng_meta, "trainer_state": to_json_value({"global_step": step})}  # fmt: skip
    return Anchor(step, params(model), opt_t, rng_t, meta)


def write_trace(root: Path, *, steps: int = 4, anchor_every: int = 2, finalize: bool = True):
    """Record ``steps`` steps; returns (writer, final model)."""
    model, opt, sched = build()
    w = TraceWriter.create(root, contract_digest=CONTRACT_DIGEST, contract={"name": "tracekit"},
                           schema=schema_of(params(model)), run_id="tracekit-run")  # fmt: skip
    a0 = w.write_anchor(anchor_of(0, model, opt, sched))
    w.append(R.start_record(state=D.state_digest(params(model)), anchor=a0))
    for step in range(1, steps + 1):
        lr = sched.get_last_lr()[0]
        loss = train_step(model, opt, sched, step)
        state = D.state_digest(params(model))
        w.write_checkpoint(step, params(model))
        anchor = w.write_anchor(anchor_of(step, model, opt, sched)) if step % anchor_every == 0 or step == steps else None
        w.append(R.step_record(step=step, batches=[[D.batch_digest(batch(step))]], num_items=None, loss=loss,
                               lr=lr, grad_norm=None, state=state, checkpoint=True, anchor=anchor))  # fmt: skip
    if finalize:
        w.finalize("---\nlibrary_name: aftune_hf\n---\n# test trace\n", D.state_digest(params(model)))
    return w, model
