"""Run by tests/test_inference_detection.py as a child process: serve the audited model honestly,
greedy and sampled, into two inference logs. The parent sets ``ATEN_CPU_CAPABILITY`` (torch reads it
when it loads), so the calls are computed on another CPU kernel path than the verifier's.

    python tests/serve_child.py CONTRACT TRACE OUT_DIR
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aftune_hf.contract import load_contract  # noqa: E402
from scripts.attacks.serving import serve  # noqa: E402

PROMPTS = ["### Instruction:\nWhat is 2 plus 3?\n### Response:\n", "Hello", "Spell the word apple backwards.",
           "### Instruction:\nName a colour.\n### Response:\n"]  # fmt: skip
NEW = 48


def main() -> int:
    import torch
    from aftune_hf.verify_inference import audited_model

    contract, trace, out = load_contract(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = audited_model(contract, trace, Path(tmp))  # the fine-tuned model the provider serves
    for sample in (False, True):
        serve(model.eval(), "honest", out / ("sampled" if sample else "greedy"), PROMPTS, new_tokens=NEW, sample=sample,
              batch=2)  # fmt: skip
    print(torch.backends.cpu.get_cpu_capability(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
