"""Red-team kit: play a cheating provider against the tiny contracts and show the verdict.

    python scripts/attacks/redteam.py --list
    python scripts/attacks/redteam.py skip_steps lower_lr        # some attacks
    python scripts/attacks/redteam.py --all                       # every attack (exit 1 if one escapes)

Each attack trains (or serves) the tiny model the way a cheater would -- the recorder commits the
cheated run faithfully, or the forger recomputes every commitment -- then runs the client's
verifier with a fresh nonce and every window challenged, and prints what it did, the verdict and
the first reason.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import unittest.mock
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch
import transformers
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from aftune_hf import AuditCallback  # noqa: E402
from aftune_hf.artifacts import dataset_digest  # noqa: E402
from aftune_hf.contract import Contract, load_contract  # noqa: E402
from aftune_hf.fuzz import reseal  # noqa: E402
from aftune_hf.generate import served_weights, wrap_generate  # noqa: E402
from aftune_hf.recipes.causal_lm import DEFAULT_DATASET, build, make_base_model  # noqa: E402
from aftune_hf.recipes.tokenizer import byte_tokenizer  # noqa: E402
from aftune_hf.report import VerificationReport  # noqa: E402
from aftune_hf.trace import TraceReader, TraceWriter, checkpoint_path  # noqa: E402
from aftune_hf.verify import verify_trace  # noqa: E402
from aftune_hf.verify_inference import verify_inference  # noqa: E402
from scripts.attacks.cheats import AnchorEdit, BoundDrift, Cheat  # noqa: E402

STEPS = 8


class Lab:
    """A work directory with the tiny base model and contracts (exact and tolerance mode)."""

    def __init__(self, work: Path, *, steps: int = STEPS, anchor_every: int = 4, tolerance: float = 1e-6) -> None:
        self.work = work
        self.base = work / "base"
        digest = make_base_model(self.base)
        self.contracts = {}
        for name, audit in (("exact", {}), ("tolerance", {"mode": "tolerance", "tolerance": tolerance, "checkpoint_every": 1})):
            data = yaml.safe_load((REPO / "configs" / "tiny-lora.yaml").read_text())
            data["base_model"] = {"path": str(self.base), "digest": digest}
            data["dataset"] = {"path": str(DEFAULT_DATASET), "digest": dataset_digest(DEFAULT_DATASET).hex()}
            data["training"]["max_steps"] = steps
            data["audit"].update(anchor_every=anchor_every, windows=2, **audit)
            (work / f"{name}.yaml").write_text(yaml.safe_dump(data))
            self.contracts[name] = load_contract(work / f"{name}.yaml")

    def record(self, name: str, *, mode: str = "exact", callbacks=(), parts_fn=None, skip_check: bool = False,
               **overrides) -> Path:  # fmt: skip
        contract = self.contracts[mode]
        parts = build(contract, str(self.work / name / "o"), disable_tqdm=True, logging_steps=10**6, **overrides)
        if parts_fn:
            parts = parts_fn(parts)
        trace = self.work / name / "trace"
        cb = AuditCallback(contract, trace)
        patch = unittest.mock.patch("aftune_hf.callback.contract_differences", return_value=[]) if skip_check else None
        if patch:
            patch.start()
        try:
            transformers.Trainer(**parts.trainer_kwargs(), callbacks=[*callbacks, cb]).train()
        finally:
            if patch:
                patch.stop()
        return trace

    def verify(self, trace: Path, mode: str = "exact", **kw) -> VerificationReport:
        return verify_trace(trace, self.contracts[mode], nonce="5eed5eed5eed5eed", windows=10**6, **kw)


# --- training attacks -------------------------------------------------------------------------------


def skip_steps(lab: Lab) -> tuple[str, VerificationReport]:
    import dataclasses

    def fewer(parts):
        return dataclasses.replace(parts, args=dataclasses.replace(parts.args, max_steps=STEPS - 3))

    trace = lab.record("skip_steps", skip_check=True, parts_fn=fewer)
    TraceWriter.resume(trace).finalize("forged card", bytes.fromhex(TraceReader(trace).entries()[-1].record["state"]))
    return f"trained {STEPS - 3} of {STEPS} steps and published the shorter trace", lab.verify(trace)


def skip_update(lab: Lab):
    return "skipped the optimizer update of step 3", lab.verify(lab.record("skip_update", callbacks=[Cheat("skip_update", 3)]))


def lower_lr(lab: Lab):
    trace = lab.record("lower_lr", callbacks=[Cheat("lr", 0, amount=0.5)])
    return "trained every step at half the learning rate (the recorder saw the agreed lr)", lab.verify(trace)


def poison_batches(lab: Lab):
    import dataclasses

    def poison(parts):
        ds = parts.train_dataset.map(lambda r, i: {**r, "input_ids": [257] + [66] * (len(r["input_ids"]) - 1)}
                                     if i in (3, 40) else r, with_indices=True)  # fmt: skip
        return dataclasses.replace(parts, train_dataset=ds)

    trace = lab.record("poison", parts_fn=poison)
    return "replaced two training examples by other text", lab.verify(trace, only_windows=())


def lower_rank(lab: Lab):
    data = yaml.safe_load((lab.work / "exact.yaml").read_text())
    data["peft"]["r"] = 2
    cheap = Contract.from_dict(data)

    def smaller(parts):
        return build(cheap, str(lab.work / "lower_rank" / "o2"), disable_tqdm=True, logging_steps=10**6)

    trace = lab.record("lower_rank", parts_fn=smaller, skip_check=True)
    return "trained LoRA rank 2 instead of 4 (recorder check bypassed)", lab.verify(trace)


def other_base(lab: Lab):
    other = make_base_model(lab.work / "other-base", seed=7)
    donor = transformers.AutoModelForCausalLM.from_pretrained(lab.work / "other-base").state_dict()

    def swap_base(parts):
        with torch.no_grad():
            for n, p in parts.model.get_base_model().named_parameters():
                if "lora_" not in n:
                    p.copy_(donor[n.replace(".base_layer.", ".")])
        return parts

    trace = lab.record("other_base", parts_fn=swap_base, skip_check=True)
    return f"fine-tuned another base model ({other[:12]}…) (recorder check bypassed)", lab.verify(trace)


def edit_weights_after_training(lab: Lab):
    trace = lab.record("edit_after")
    f = trace / checkpoint_path(STEPS)
    t = safetensors.torch.load_file(f)
    for k in t:
        t[k] = t[k] * 1.05
    safetensors.torch.save_file(t, f, metadata={"format": "pt"})
    reseal(trace)
    return "scaled the final weights by 1.05 after training and recomputed the file digests and root", lab.verify(trace)


def deliver_other_weights(lab: Lab):
    trace = lab.record("deliver")
    t = safetensors.torch.load_file(trace / checkpoint_path(STEPS - 1))
    (lab.work / "delivered").mkdir(exist_ok=True)
    safetensors.torch.save_file(t, lab.work / "delivered" / "adapter_model.safetensors", metadata={"format": "pt"})
    return "delivered the adapter of step 7 instead of the final one", lab.verify(trace, model=lab.work / "delivered")


def forge_consistent_trace(lab: Lab):
    trace = lab.record("forge", callbacks=[Cheat("nudge", 6, amount=1e-3)])
    return "edited weights inside training at step 6; every commitment is consistent with the edit", lab.verify(trace)


def drift_under_tolerance(lab: Lab):
    trace = lab.record("drift", mode="tolerance", callbacks=[Cheat("drift", 1, amount=6e-7)])
    return ("drifted every weight by 6e-7 relative per step (each step under the 1e-6 tolerance); "
            "replay accumulates it within a window"), lab.verify(trace, mode="tolerance")  # fmt: skip


def edit_anchor_lr(lab: Lab):
    trace = lab.record("anchor_lr", callbacks=[AnchorEdit("lr_zero", 4)])
    return ("set the optimizer's and scheduler's lr to 0 at the step-4 anchor (training silently stops); "
            "torch would restore it on replay"), lab.verify(trace)  # fmt: skip


def edit_anchor_moments(lab: Lab):
    trace = lab.record("anchor_moments", mode="tolerance", callbacks=[AnchorEdit("moments", 4)])
    return "scaled Adam's second moments by 1e6 at the step-4 anchor (tolerance mode)", lab.verify(trace, mode="tolerance")


def bound_aware_drift_random(lab: Lab):
    tol = lab.contracts["tolerance"].audit.tolerance
    trace = lab.record("drift_random", mode="tolerance", callbacks=[BoundDrift(0.7 * tol, "random")])
    return ("moved every tensor by 0.7 x tolerance per step in a fresh random direction (each step alone "
            "within the bound)"), lab.verify(trace, mode="tolerance")  # fmt: skip


def bound_aware_drift_fixed(lab: Lab):
    tol = lab.contracts["tolerance"].audit.tolerance
    trace = lab.record("drift_fixed", mode="tolerance", callbacks=[BoundDrift(0.5 * tol, "fixed")])
    return "moved every tensor by 0.5 x tolerance per step in one fixed direction", lab.verify(trace, mode="tolerance")


# --- inference attacks -------------------------------------------------------------------------------


def _serve(lab: Lab, name: str, mutate: Callable | None = None, lie: bool = False, **gen) -> tuple[Path, Path]:
    contract = lab.contracts["exact"]
    trace = lab.work / "serve-trace"
    if not trace.exists():
        lab.record("serve-run")
        shutil.copytree(lab.work / "serve-run" / "trace", trace)
    final = TraceReader(trace).checkpoint(STEPS)
    model = build(contract, str(lab.work / name / "m")).model.eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in final:
                p.copy_(final[n])
    honest = served_weights(model)
    if mutate:
        mutate(model)
    with unittest.mock.patch("aftune_hf.generate.served_weights", return_value=honest) if lie else _nothing():
        wrap_generate(model, lab.work / name / "log")
    tok = byte_tokenizer(padding_side="left")
    model.generate(**tok(["What is 2 plus 3?", "Hello"], return_tensors="pt", padding=True), max_new_tokens=64, **gen)
    model.aftune_log.publish()
    model.aftune_log.close()
    return lab.work / name / "log", trace


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def serve_other_model(lab: Lab):
    def other(model):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)

    log, trace = _serve(lab, "serve_other", other, lie=True)
    return ("served another model while claiming the audited weights' digests",
            verify_inference(log, lab.contracts["exact"], trace=trace, nonce="0101010101010101"))  # fmt: skip


def serve_quantised(lab: Lab):
    def int8(model):
        with torch.no_grad():
            for p in model.parameters():
                scale = p.abs().max().clamp_min(1e-12) / 127
                p.copy_((p / scale).round() * scale)

    log, trace = _serve(lab, "serve_int8", int8, lie=True)
    return ("served an int8-quantised copy while claiming the audited weights' digests",
            verify_inference(log, lab.contracts["exact"], trace=trace, nonce="0202020202020202"))  # fmt: skip


def change_decoding(lab: Lab):
    import json

    log, trace = _serve(lab, "serve_temp", do_sample=True, temperature=1.3)
    calls = lab.work / "calls.json"
    calls.write_text(json.dumps({"calls": [{"call": 1, "rows": [], "config": {"temperature": 0.7}}]}))
    report = verify_inference(log, lab.contracts["exact"], trace=trace, calls=calls)
    return "sampled at temperature 1.3 when the client asked for 0.7", report


ATTACKS: dict[str, Callable[[Lab], tuple[str, VerificationReport]]] = {
    f.__name__: f
    for f in (skip_steps, skip_update, lower_lr, poison_batches, lower_rank, other_base, edit_weights_after_training,
              deliver_other_weights, forge_consistent_trace, drift_under_tolerance, edit_anchor_lr, edit_anchor_moments,
              bound_aware_drift_random, bound_aware_drift_fixed, serve_other_model,
              serve_quantised, change_decoding)
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("attacks", nargs="*", help="attack names (see --list); default: all")
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    if a.list:
        print("\n".join(ATTACKS))
        return 0
    names = list(ATTACKS) if a.all or not a.attacks else a.attacks
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        ap.error(f"unknown attacks {unknown}; see --list")
    transformers.logging.set_verbosity_error()
    work = Path(tempfile.mkdtemp(prefix="aftune-redteam-"))
    lab = Lab(work)
    escaped = []
    for name in names:
        what, report = ATTACKS[name](lab)
        reason = report.failures[0] if report.failures else None
        first = f"{reason.check}/{reason.code}" + (f" at step {reason.step}" if reason.step is not None else "") \
            + f": {reason.reason[:120]}" if reason else (report.error or "")  # fmt: skip
        print(f"{name:28} {report.verdict:5}  {what}\n{'':34} -> {first}", flush=True)
        if report.verdict != "FAIL":
            escaped.append(name)
    shutil.rmtree(work, ignore_errors=True)
    print(f"\n{len(names) - len(escaped)}/{len(names)} attacks caught" + (f"; ESCAPED: {escaped}" if escaped else ""))
    return 1 if escaped else 0


if __name__ == "__main__":
    raise SystemExit(main())
