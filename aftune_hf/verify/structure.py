"""The cheap whole-trace checks and the challenge: everything decided without re-executing a step.

Example:
    >>> integrity = check_structure(TraceReader("runs/trace"), contract, workdir)   # doctest: +SKIP
    >>> make_challenge(contract, integrity.trace_root, bytes.fromhex("a1b2")).chosen  # doctest: +SKIP
    (0, 2, 3)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import digest as D
from ..contract import Contract
from ..errors import AftuneError, ClientArtifactError, ConfigError, ManifestMismatchError, ProviderFault
from ..report import Failure
from ..trace import Integrity, TraceReader
from .derive import FLOAT_RTOL, Expected, derivable_differences, derive_expected, same_value


@dataclass(frozen=True)
class Challenge:
    """The windows a (trace root, nonce) pair selects."""

    nonce: bytes
    seed: bytes
    bounds: tuple[tuple[int, int], ...]  # every window (start, end]
    chosen: tuple[int, ...]


def window_bounds(contract: Contract) -> tuple[tuple[int, int], ...]:
    """Windows ``(a_i, a_{i+1}]`` between consecutive anchors (every ``anchor_every``, and the end)."""
    n, k = contract.training.max_steps, contract.audit.anchor_every
    edges = sorted({*range(0, n, k), n})
    return tuple(zip(edges, edges[1:]))


NONCE_BYTES = (8, 64)  # the client's randomness: at least 64 bits, at most a bounded line


def parse_nonce(nonce: str | bytes | None) -> bytes:
    """The client's nonce as bytes (hex text or bytes; 16 random bytes when absent).

    Raises:
        ConfigError: ``invalid_nonce`` if it is not hex or not 8 to 64 bytes long.
    """
    if nonce is None:
        return os.urandom(16)
    if isinstance(nonce, str):
        try:
            nonce = bytes.fromhex(nonce)
        except ValueError:
            raise ConfigError("invalid_nonce", "the nonce must be hex digits") from None
    lo, hi = NONCE_BYTES
    if not lo <= len(nonce) <= hi:
        raise ConfigError("invalid_nonce", f"the nonce must be {lo} to {hi} bytes ({2 * lo} to {2 * hi} hex digits) "
                          f"of your own randomness, got {len(nonce)}")  # fmt: skip
    return bytes(nonce)


def make_challenge(contract: Contract, trace_root: bytes, nonce: bytes, k: int | None = None) -> Challenge:
    bounds = window_bounds(contract)
    seed = D.challenge_seed(trace_root, nonce)
    chosen = D.sample_windows(seed, len(bounds), k or contract.audit.windows)
    return Challenge(nonce, seed, bounds, tuple(chosen))


# --- structure -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Needed:
    """The steps whose checkpoints and anchors a verification opens (a trace read from the Hub)."""

    checkpoints: frozenset[int]
    anchors: frozenset[int]


def files_needed(challenge: Challenge, windows: Sequence[int]) -> Needed:
    """What replaying ``windows`` opens: each window's checkpoints and its two anchors, and the
    step-0 anchor (the initial-state check)."""
    checkpoints, anchors = set(), {0}
    for i in windows:
        start, end = challenge.bounds[i]
        checkpoints.update(range(start + 1, end + 1))
        anchors.update((start, end))
    return Needed(frozenset(checkpoints), frozenset(anchors))


def check_structure(
    reader: TraceReader, contract: Contract, workdir: Path, expected: Expected | None = None, *, measure: bool = False,
    needed: Needed | None = None, integrity: Integrity | None = None,
) -> Integrity:
    """The cheap whole-trace check; raises a :class:`ProviderFault` on the first problem.

    Besides the commitments: every step's lr is the contract's schedule at that step, and every
    anchor's optimizer options, scheduler state and step counter are the contract's
    (``expected``, derived from the client's recipe when not given). ``measure`` (``aftune
    calibrate``): floats compared as in tolerance mode, the step-0 state left to the caller to measure.
    ``needed`` (a trace read from the Hub): open only these checkpoints and anchors
    (:func:`files_needed`); every record is still checked. ``integrity``: what
    ``reader.check_integrity()`` already returned (not recomputed)."""
    from ..errors import CommitmentError, ContractViolationError

    integrity = integrity or reader.check_integrity()
    header = reader.header()
    if header["contract_digest"] != contract.digest_hex():
        raise ContractViolationError("contract_mismatch", f"trace binds contract {header['contract_digest']}, "
                                     f"the client's is {contract.digest_hex()}")  # fmt: skip
    if header["contract"] != contract.canonical():
        raise ContractViolationError("contract_mismatch", "the header's copy of the contract is not the client's")
    want = contract.training.max_steps
    if integrity.num_steps != want:
        raise CommitmentError("step_count", f"trace has {integrity.num_steps} steps, contract says {want}")
    from ..card import render_card
    from ..trace import CARD

    if reader.read_bytes(CARD) != render_card(header, integrity.root).encode("utf-8"):
        raise ManifestMismatchError("card_mismatch", "README.md is not the card this trace implies", path=CARD)
    expected = expected or derive_expected(contract, workdir / "init")
    init_digest, schema = expected.initial_state, dict(expected.schema)
    if reader.schema() != schema:
        raise ManifestMismatchError("schema_mismatch", "trainable tensors differ from the contract's recipe")
    steps = integrity.steps()
    audit = contract.audit
    if not measure:
        _check_initial(reader, contract, expected, steps[0]["state"], init_digest)
    rtol = 0.0 if audit.mode == "exact" and not measure else FLOAT_RTOL
    for s, rec in steps.items():
        if s and not same_value(D.decode_float(rec["lr"]), expected.lrs[s - 1], rtol):
            raise ContractViolationError("lr_schedule", f"recorded lr {D.decode_float(rec['lr']):.9g} is not the "
                                         f"contract's {expected.lrs[s - 1]:.9g}", step=s)  # fmt: skip
        if s and ("cells" in rec) != (audit.layer_blocks is not None):
            raise ContractViolationError("cells_commitment", "a step record's cell commitments (cells, optim) do not "
                                         "match the contract's audit.layer_blocks", step=s)  # fmt: skip
        need_anchor = s == 0 or s % audit.anchor_every == 0 or s == want
        if need_anchor and rec["anchor"] is None:
            raise ManifestMismatchError("challenged_window_unavailable", "anchor missing", step=s)
        if s and (s % audit.checkpoint_every == 0 or s == want) and not rec["checkpoint"]:
            raise ManifestMismatchError("checkpoint_missing", "checkpoint required by the contract", step=s)
        opened = needed is None or s in needed.checkpoints
        if s and rec["checkpoint"] and opened and D.state_digest(reader.checkpoint(s, schema)).hex() != rec["state"]:
            raise CommitmentError("state_mismatch", "checkpoint is not the committed state", step=s)
        if rec["anchor"] is not None and (needed is None or s in needed.anchors):
            anchor = reader.anchor(s, schema)
            if anchor.digest().hex() != rec["anchor"] or D.state_digest(anchor.params).hex() != rec["state"]:
                raise CommitmentError("anchor_mismatch", "anchor is not the committed state", step=s)
            if "optim" in rec and anchor.part_digests()["optimizer"].hex() != rec["optim"]:
                raise CommitmentError("anchor_mismatch", "the anchor's optimizer state is not the committed one", step=s)
            if anchor.world_size != contract.training.world_size:  # else no rank's RNG could be compared
                raise ContractViolationError("anchor_world_size", f"the anchor holds {anchor.world_size} processes' RNG "
                                             f"state, the contract has world_size {contract.training.world_size}", step=s)  # fmt: skip
            if s not in expected.groups or (diffs := derivable_differences(anchor, expected, rtol=rtol)):
                raise ContractViolationError("anchor_hyperparameters", "the anchor's derivable state is not the "
                                             f"contract's: {'; '.join(diffs[:4]) or 'not an anchor step'}", step=s)  # fmt: skip
    return integrity


def _check_initial(reader: TraceReader, contract: Contract, expected: Expected, recorded: str, init_digest: bytes) -> None:
    """Step 0 is the recipe's initial state: bit-equal, or in tolerance mode each tensor within the
    tolerance (new tensors -- an adapter, a head -- are drawn by kernels whose last bits differ
    between CPU kernel paths and devices)."""
    from ..errors import ContractViolationError

    audit = contract.audit
    if audit.mode == "tolerance" and expected.initial is not None:
        from .window import distance

        dist, _ = distance(reader.anchor(0, dict(expected.schema)).params, expected.initial)
        if not dist <= audit.tolerance:
            raise ContractViolationError("initial_state", f"step 0 is {dist:.3e} from the contract's initial state "
                                         f"(tolerance {audit.tolerance:.3e})", step=0)  # fmt: skip
    elif recorded != init_digest.hex():
        raise ContractViolationError("initial_state", "step 0 is not the contract's base/initial state", step=0)


def check_client_artifacts(c: Contract) -> None:
    """The client's own base model and dataset must hash to its contract's digests (else ERROR)."""
    from ..artifacts import check_artifacts

    try:
        check_artifacts(c)
    except ProviderFault as e:  # raised as a contract violation for the provider; here it is the client's file
        raise ClientArtifactError(e.code, f"your local file does not match your contract: {e.detail}", path=e.path) from None


def failure_from(check: str, e: AftuneError) -> Failure:
    return Failure(check, e.code, f"{e.detail}{f' ({e.path})' if e.path else ''}", e.step)
