"""Re-derive a committed call's tokens from the audited model: one teacher-forced pass, then each token.

The forward pass covers every generated token: each row is fed its prompt and output (less the
last output token, which produced nothing that was served), rows padded in batches of similar
length (:func:`length_groups`: padding costs as much as the tokens it pads). Per row it yields the
final hidden states and logits at the positions that chose each output token. :func:`check_row`
then checks the committed activations (:func:`activation_errors`), and every token against the committed decoding settings
with the processors ``generate`` applied, computed for all positions at once.

Every token also gets a **token score** (DiFR-style, from the committed randomness): the
probability mass, under the audited model's distribution at that position, between what the
audited model would have emitted and the served token. Sampled: the distance of the committed
uniform from the served token's CDF interval (0 inside it); greedy: ``p(argmax) - p(served)``.
Honest serving scores 0 up to float noise; a served distribution that differs (another model,
lower precision, other settings) scores > 0 at the tokens it changed. It needs no activation
commitment, so it also rates calls served on other hardware or checked without activations.

Example:
    >>> forward = teacher_forced(model, tensors, rows=4)                       # doctest: +SKIP
    >>> res = check_row(record, tensors, 0, *forward[0], rtol=1e-4)             # doctest: +SKIP
    >>> res.ok, res.token_score                                                 # doctest: +SKIP
    (True, 0.0)
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .. import digest as D
from ..generate import sampling_cdf
from ..report import CallResult
from . import fastmath

TIE_MARGIN = 1e-4  # relative to the largest |logit|: greedy ties within this are accepted
CDF_TOLERANCE = 1e-6  # a sampled uniform this close to its token's interval is accepted
GROUP_OVERHEAD = 32  # tokens' worth of compute one more forward pass costs (to decide batching)


def length_groups(lengths: Sequence[int], overhead: int = GROUP_OVERHEAD) -> list[list[int]]:
    """Rows batched for padded forward passes: sorted by length, cut where padding the shorter rows
    would cost more than ``overhead`` tokens per extra pass (an exact minimum over the cut points).

    >>> length_groups([187, 158, 156, 155])
    [[0], [1, 2, 3]]
    """
    order = sorted(range(len(lengths)), key=lambda r: -lengths[r])
    n = len(order)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for i in range(1, n + 1):
        for j in range(i):  # rows order[j:i] in one pass, padded to the longest, order[j]
            cost = best[j] + overhead + lengths[order[j]] * (i - j)
            if cost < best[i]:
                best[i], cut[i] = cost, j
    groups, i = [], n
    while i:
        groups.append(sorted(order[cut[i] : i]))
        i = cut[i]
    return groups[::-1]


def teacher_forced(model: Any, tensors: Mapping[str, torch.Tensor], rows: int,
                   fast: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Per row: the final hidden states and logits at the positions that chose each output token;
    ``fast``: float32 CPU linear layers on oneDNN's kernel (:mod:`.fastmath`)."""
    seqs = [torch.cat([tensors[f"prompt.{r}"], tensors[f"output.{r}"][:-1]]) for r in range(rows)]
    head = model.get_output_embeddings()
    out: list[Any] = [None] * rows
    for group in length_groups([len(s) for s in seqs]):
        width = max(len(seqs[r]) for r in group)
        ids = torch.zeros(len(group), width, dtype=torch.int64)
        mask = torch.zeros(len(group), width, dtype=torch.int64)
        for i, r in enumerate(group):
            ids[i, : len(seqs[r])], mask[i, : len(seqs[r])] = seqs[r], 1
        hidden: list[torch.Tensor] = []
        handle = head.register_forward_pre_hook(lambda _m, a: hidden.append(a[0].detach()))
        try:
            with torch.inference_mode(), fastmath.OneDnnLinear() if fast else contextlib.nullcontext():  # on the model's device (e.g. a GPU); the checks run on the CPU
                padded = {"attention_mask": mask.to(model.device)} if not bool(mask.all()) else {}  # else: causal only
                logits = model(input_ids=ids.to(model.device), **padded).logits.float().cpu()
        finally:
            handle.remove()
        h = hidden[-1].float().cpu()
        for i, r in enumerate(group):
            p, n = len(tensors[f"prompt.{r}"]), len(tensors[f"output.{r}"])
            out[r] = (h[i, p - 1 : p - 1 + n], logits[i, p - 1 : p - 1 + n])
    return out


def activation_errors(h: torch.Tensor, value: torch.Tensor, rtol: float) -> torch.Tensor:
    """Per token: the relative error of the committed ``value`` against the recomputed hidden state's
    largest-magnitude entry -- the smallest over the entries within ``rtol`` of that magnitude
    (near-ties: the provider's kernels may have ranked them the other way); NaN or inf: inf."""
    mag = h.abs()
    near = mag >= (1 - rtol) * mag.max(-1, keepdim=True).values
    rel = (h - value[:, None]).abs() / value.abs().clamp_min(1e-6)[:, None]
    rel = torch.where(near & rel.isfinite(), rel, torch.full_like(rel, float("inf")))
    return rel.min(-1).values


def processed_scores(logits: torch.Tensor, prompt: torch.Tensor, output: torch.Tensor, cfg: Mapping[str, Any]) -> torch.Tensor:
    """The scores ``generate`` had at each output position after its processors (repetition penalty,
    then ``min_new_tokens``), for all positions at once; the same float operations as
    transformers' ``RepetitionPenaltyLogitsProcessor`` and ``MinNewTokensLengthLogitsProcessor``."""
    scores = logits.clone()
    n, vocab = scores.shape
    penalty = cfg["repetition_penalty"]
    if penalty is not None and D.decode_float(penalty) != 1.0:
        penalty = D.decode_float(penalty)
        first = torch.full((vocab + 1,), n, dtype=torch.int64)  # the position each token first appears in the output
        first.scatter_reduce_(0, output.clamp(max=vocab), torch.arange(n), reduce="amin")
        in_prompt = torch.zeros(vocab + 1, dtype=torch.bool)
        in_prompt[prompt.clamp(max=vocab)] = True
        seen = in_prompt[None, :vocab] | (first[None, :vocab] < torch.arange(n)[:, None])  # ids before position t
        scores = torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)
    if cfg["min_new_tokens"] and cfg["eos_token_id"] is not None and cfg["eos_token_id"] < vocab:
        scores[: cfg["min_new_tokens"], cfg["eos_token_id"]] = -float("inf")
    return scores


def token_scores(scores: torch.Tensor, prompt: torch.Tensor, output: torch.Tensor, cfg: Mapping[str, Any],
                 seed: bytes | None, row: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per output token: (its score, whether it follows from the committed decoding) -- see the module doc."""
    chosen = output[:, None]
    n = len(output)
    if not cfg["do_sample"]:
        best = scores.max(-1).values
        margin = TIE_MARGIN * best.abs().clamp_min(1.0)
        ok = scores.gather(-1, chosen)[:, 0] >= best - margin
        probs = torch.softmax(scores.double(), -1)
        return torch.nan_to_num(probs.max(-1).values - probs.gather(-1, chosen)[:, 0], nan=1.0).float(), ok
    ids = torch.cat([prompt, output])[None]
    cdf = sampling_cdf(scores, ids[:, : len(prompt)].expand(n, -1), cfg)
    u = torch.tensor([D.uniform(seed, row, t) for t in range(n)], dtype=cdf.dtype) * cdf[:, -1]
    hi = cdf.gather(-1, chosen)[:, 0]
    lo = torch.where(chosen[:, 0] > 0, cdf.gather(-1, (chosen - 1).clamp_min(0))[:, 0], torch.zeros_like(hi))
    off = torch.clamp(torch.maximum(lo - u, u - hi), min=0.0)  # a removed token (lo == hi): |u - lo|
    return torch.nan_to_num(off, nan=1.0).float(), off <= CDF_TOLERANCE  # NaN (scores NaN): never passes, scores 1


def check_row(record: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], row: int, h: torch.Tensor,
              logits: torch.Tensor, rtol: float) -> CallResult:  # fmt: skip
    """Check one row against its recomputed hidden states ``h`` and logits (one per output token)."""
    cfg, call = record["config"], record["call"]
    prompt, output = tensors[f"prompt.{row}"], tensors[f"output.{row}"]
    n = len(output)
    if output[-1] != cfg["eos_token_id"] and n != cfg["max_new_tokens"] or n > cfg["max_new_tokens"]:
        return CallResult(call, row, False, n, 0.0, "output length inconsistent with eos/max_new_tokens")
    err = float(activation_errors(h, tensors[f"act_value.{row}"], rtol).max())
    seed = bytes.fromhex(record["seed"]) if record["seed"] else None
    if cfg["do_sample"] and seed is None:
        return CallResult(call, row, False, n, err, "sampled call without a seed")
    scores, ok = token_scores(processed_scores(logits, prompt, output, cfg), prompt, output, cfg, seed, row)
    stats = dict(token_score=float(scores.double().mean()), tokens_off=int((~ok).sum()))
    if not err <= rtol:  # NaN never passes
        return CallResult(call, row, False, n, err, f"activations differ (max relative error {err:.2e} > {rtol:.0e})", **stats)
    wrong = (~ok).nonzero()
    if len(wrong):
        how = "is not the greedy choice" if not cfg["do_sample"] else "does not follow from the committed sampling"
        return CallResult(call, row, False, n, err, f"token {int(wrong[0, 0])} {how}", **stats)
    return CallResult(call, row, True, n, err, **stats)


def check_call(model: Any, record: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], rtol: float) -> list[CallResult]:
    """Teacher-force every row of a call and check activations and every token's decoding (on the CPU
    first with oneDNN's float32 linear kernel; a call that fails that is checked again without it)."""
    rows, call = record["rows"], record["call"]
    bad = [r for r in range(rows) if not len(tensors[f"prompt.{r}"]) or not len(tensors[f"output.{r}"])]
    if bad:
        return [CallResult(call, r, False, 0, 0.0, "empty prompt or output") for r in bad]
    vocab = model.get_input_embeddings().num_embeddings
    bad = [r for r in range(rows) for ids in (tensors[f"prompt.{r}"], tensors[f"output.{r}"]) if ids.min() < 0 or ids.max() >= vocab]
    if bad:  # the model could not have read or emitted these ids (and embedding them would raise)
        return [CallResult(call, r, False, len(tensors[f"output.{r}"]), 0.0, f"token ids outside the model's vocabulary of {vocab}")
                for r in sorted(set(bad))]  # fmt: skip

    def checked(fast: bool) -> list[CallResult]:
        forward = teacher_forced(model, tensors, rows, fast)
        return [check_row(record, tensors, r, h, logits, rtol) for r, (h, logits) in enumerate(forward)]

    fast = fastmath.available() and model.device.type == "cpu"
    results = checked(fast)
    return checked(False) if fast and not all(res.ok for res in results) else results  # a FAIL is the default kernels'
