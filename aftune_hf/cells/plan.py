"""What layer-block cells cost and catch: each block's share of a training step's FLOPs and its
verifier memory, and how many cells a challenge must open for a wanted detection probability.

A block's FLOP share is its share of the parameters that multiply activations (every parameter but
the input embedding table, which is only indexed; a tied head would count, but cells refuse tied
weights); attention-score FLOPs are left out on both sides. Its verifier memory is what the cell
check holds for it: fp32 parameters, gradients and the two Adam moments.

Example:
    >>> shares, peak = block_costs(config, (0, 2, 4))      # doctest: +SKIP
    >>> cell_plan(1000, shares, 0.1, 0.99)["cells"]        # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..report import detection_probability
from .track import block_ranges

STATE_COPIES = 4  # parameters, gradients, exp_avg, exp_avg_sq


def block_costs(config: Any, boundaries: Sequence[int]) -> tuple[list[float], list[int]]:
    """Per block: (share of a step's FLOPs, bytes of fp32 block state the verifier holds)."""
    from .execute import _block_names, meta_model

    model = meta_model(config)
    embedding = model.get_input_embeddings().weight
    sizes = []
    for first, last in block_ranges(boundaries):
        names = _block_names(model, first, last)
        compute = sum(model.get_parameter(n).numel() for n in names if model.get_parameter(n) is not embedding)
        sizes.append((compute, sum(model.get_parameter(n).numel() for n in names)))
    total = sum(c for c, _ in sizes) or 1
    return [c / total for c, _ in sizes], [n * 4 * STATE_COPIES for _, n in sizes]


def cell_plan(steps: int, shares: Sequence[float], bad_fraction: float, confidence: float) -> dict[str, float | int]:
    """Cells to open so that a provider who falsified ``bad_fraction`` of the ``steps x blocks`` cells
    is caught with probability >= ``confidence``; the expected share of training FLOPs they re-execute."""
    if not (0 < bad_fraction <= 1 and 0 < confidence < 1 and steps >= 1 and shares):
        raise ValueError("need steps >= 1, blocks, 0 < bad_fraction <= 1, 0 < confidence < 1")
    n = steps * len(shares)
    bad = min(n, max(1, round(bad_fraction * n)))
    k = next((k for k in range(1, n + 1) if detection_probability(n, k, bad) >= confidence), n)
    mean_share = sum(shares) / len(shares)
    return {"cells_total": n, "cells": k, "probability": detection_probability(n, k, bad),
            "flops_share": min(1.0, k * mean_share / steps), "max_block_share": max(shares)}  # fmt: skip


def checked_flops_share(steps: int, shares: Sequence[float], blocks: Sequence[int]) -> float:
    """The share of the run's FLOPs re-executed by checking cells of ``blocks`` (one entry per cell)."""
    return math.fsum(shares[b] for b in blocks) / steps
