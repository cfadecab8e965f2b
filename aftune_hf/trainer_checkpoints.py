"""Which Trainer checkpoints a resume may start from: complete ones the trace has committed.

The Trainer writes ``checkpoint-N/`` file by file (``trainer_state.json`` last) and
``resume_from_checkpoint=True`` takes the highest N, torn or not. Before a resume can pick one,
the recorder moves aside (never deletes) each checkpoint that is torn, or ahead of the trace's
last committed step, so the Trainer's own choice is one the trace can continue from.

Example:
    >>> set_aside("runs/out", last_committed=7)   # doctest: +SKIP
    [('runs/out/checkpoint-8', 'runs/out/torn-checkpoint-8')]
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)
_NAME = re.compile(r"checkpoint-(\d+)")


def is_complete(checkpoint: Path, step: int) -> bool:
    """Whether the Trainer finished writing ``checkpoint`` (its last file parses and names ``step``)."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("global_step") == step


def set_aside(output_dir: str | os.PathLike[str], last_committed: int) -> list[tuple[str, str]]:
    """Rename each ``checkpoint-N`` that is torn (``torn-checkpoint-N``) or past ``last_committed``
    (``uncommitted-checkpoint-N``); returns ``(old, new)`` pairs. Safe if several processes run it."""
    root = Path(output_dir)
    moved: list[tuple[str, str]] = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        m = _NAME.fullmatch(path.name)
        if not m or not path.is_dir():
            continue
        step = int(m.group(1))
        reason = "torn" if not is_complete(path, step) else "uncommitted" if step > last_committed else None
        if reason is None:
            continue
        target, n = root / f"{reason}-{path.name}", 0
        while target.exists():
            n += 1
            target = root / f"{reason}-{path.name}.{n}"
        try:
            path.rename(target)
        except FileNotFoundError:  # another process of this run moved it first
            continue
        moved.append((str(path), str(target)))
        logger.warning("aftune: moved %s checkpoint %s to %s (a resume must not start from it)", reason, path, target.name)
    return moved
