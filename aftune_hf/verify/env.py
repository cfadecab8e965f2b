"""Exact mode needs the recorder's numerics environment: compare it with this one, adopt what can be.

The trace header records the recorder's environment (:func:`aftune_hf.trace.environment`). Bits
depend on the torch build, the CPU kernel path (``ATEN_CPU_CAPABILITY``), the intra-op thread
count, the device and its CUDA/cuDNN, and the library versions that build the computation. The
thread count is adopted (``torch.set_num_threads``); any other difference is reported, and an
exact replay that then differs is the verifier's ERROR naming it, not the provider's FAIL.

Example:
    >>> differences = adopt_environment(reader.header()["environment"])   # doctest: +SKIP
    >>> differences
    ['cpu_capability: trace AVX512, here AVX2 (run with ATEN_CPU_CAPABILITY=avx512...)']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ..trace import environment

# the fields an exact replay's bits depend on, with how to get the recorder's
EXACT_FIELDS: dict[str, str] = {
    "torch": "install that torch version",
    "transformers": "install that transformers version",
    "peft": "install that peft version",
    "trl": "install that trl version",
    "cpu_capability": "set ATEN_CPU_CAPABILITY (it can only lower this machine's)",
    "device": "verify on that device",
    "cuda": "install the torch build for that CUDA",
    "cudnn": "install the torch build with that cuDNN",
}
MAX_THREADS = 1024


def adopt_environment(recorded: Mapping[str, str], say: Callable[[str], None] = lambda _m: None) -> list[str]:
    """Take the recorder's thread count; return the other differences that can change the bits."""
    import torch

    threads = recorded.get("threads", "")
    if threads.isdigit() and 1 <= int(threads) <= MAX_THREADS and int(threads) != torch.get_num_threads():
        say(f"using {threads} torch threads, as the recorder did (exact mode)")
        torch.set_num_threads(int(threads))
    here = environment()
    return [f"{k}: trace {recorded[k]}, here {here[k]} ({hint})" for k, hint in EXACT_FIELDS.items()
            if k in recorded and recorded[k] != here[k]]  # fmt: skip
