"""The trace's ``README.md``: a Hugging Face Hub card with YAML front matter and a summary.

Example:
    >>> print(render_card(header, root_fields)[:3])   # doctest: +SKIP
    ---
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml


def render_card(header: Mapping[str, Any], root: Mapping[str, Any]) -> str:
    """Render the card from the trace header and the root fields (trace root excluded)."""
    contract = header.get("contract", {})
    base = contract.get("base_model", {}).get("digest", "unknown")
    name = contract.get("name") or "aftune run"
    front = {
        "library_name": "aftune_hf",
        "tags": ["aftune", "audit-trace", "lora" if contract.get("peft") else "full-fine-tune"],
        "aftune": {
            "format_version": root["format_version"],
            "contract_digest": root["contract_digest"],
            "base_model_digest": base,
            "num_steps": root["num_steps"],
        },
    }
    return (
        "---\n"
        + yaml.safe_dump(front, sort_keys=True)
        + "---\n\n"
        + f"# Audit trace: {name}\n\n"
        + "This repository is an [aftune_hf](https://pypi.org/project/aftune_hf/) audit trace: per-step\n"
        + "commitments (BLAKE3 hash chain + Merkle tree), checkpoints and anchors of a fine-tuning run.\n"
        + "It lets the client re-execute randomly chosen step windows and check the provider did the agreed work.\n\n"
        + "| | |\n|---|---|\n"
        + f"| steps | {root['num_steps']} |\n"
        + f"| records | {root['num_records']} |\n"
        + f"| contract digest | `{root['contract_digest']}` |\n"
        + f"| base model digest | `{base}` |\n"
        + f"| chain head | `{root['chain_head']}` |\n"
        + f"| final state | `{root['final_state']}` |\n\n"
        + "The trace root is in `root.json` (`trace_root`). To verify, pin this repository's commit sha, draw a\n"
        + "fresh nonce, and run:\n\n"
        + "```bash\naftune verify hf://REPO_ID@COMMIT_SHA --contract contract.yaml --nonce NONCE\n```\n"
    )
