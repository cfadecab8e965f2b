"""Ways a provider can serve something cheaper than the audited model and commit it as the audited one.

Each serving is run through the real wrapped ``generate`` (:func:`aftune_hf.generate.wrap_generate`),
so the log is what such a provider would publish: the claimed (audited) weights digests, the
client's decoding settings, committed seeds; only what produced the tokens differs. Used by
``scripts/detection_curves.py`` and the inference tests.

    honest        the audited model, as is (the baseline: run it under other kernels for noise)
    swap          another model of the same architecture (other weights)
    bf16 / fp16   the audited model cast to bfloat16 / float16 and run in that precision
    int8          torch's dynamic int8 quantization of every Linear layer
    kv_bf16 / kv_fp16   the audited model with its KV cache stored in bfloat16 / float16
    temperature   sampled at temperature 1.0 while the committed (asked) one is 0.8
    top_p         sampled with top_p 1.0 while the committed (asked) one is 0.95
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers

import aftune_hf.generate as G

SERVINGS = ("honest", "swap", "bf16", "fp16", "int8", "kv_bf16", "kv_fp16", "temperature", "top_p")
SAMPLED = {"do_sample": True, "temperature": 0.8, "top_p": 0.95}  # what the client asks for
LIES = {"temperature": {"temperature": None}, "top_p": {"top_p": None}}  # what is used instead (None: off)


class RoundedCache(transformers.DynamicCache):
    """A KV cache that stores keys and values in a lower precision (and computes with those)."""

    def __init__(self, dtype: torch.dtype, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dtype = dtype

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # noqa: D102
        k, v = (x.to(self.dtype).to(x.dtype) for x in (key_states, value_states))
        return super().update(k, v, layer_idx, *args, **kwargs)


def served_model(audited: Any, kind: str, donor: str | Path | None = None) -> Any:
    """The model a provider serving ``kind`` runs (a copy; ``audited`` is untouched)."""
    if kind == "swap":
        if donor is None:
            raise ValueError("swap needs a donor model directory")
        return transformers.AutoModelForCausalLM.from_pretrained(donor).eval()
    model = copy.deepcopy(audited).eval()
    if kind in ("bf16", "fp16"):
        return model.to(torch.bfloat16 if kind == "bf16" else torch.float16)
    if kind == "int8":
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return model


@contextlib.contextmanager
def _lying_sampler(kind: str) -> Iterator[None]:
    """Sample with other settings than the committed ones (the record keeps the asked ones)."""
    if kind not in LIES:
        yield
        return
    real = G._InverseCdfSampler.__init__

    def init(self, config, seed, prompt_len):
        real(self, {**config, **LIES[kind]}, seed, prompt_len)

    G._InverseCdfSampler.__init__ = init
    try:
        yield
    finally:
        G._InverseCdfSampler.__init__ = real


def serve(audited: Any, kind: str, log: str | Path, prompts: Sequence[str], *, new_tokens: int, sample: bool = True,
          batch: int = 8, donor: str | Path | None = None) -> None:  # fmt: skip
    """Serve ``prompts`` (``batch`` rows a call, ``new_tokens`` each, no early EOS) the ``kind`` way
    into the inference log ``log``, claiming the audited weights; publishes the log."""
    from aftune_hf.recipes.tokenizer import byte_tokenizer

    model = served_model(audited, kind, donor)
    claimed = G.served_weights(audited)
    real = G.served_weights
    G.served_weights = lambda _m: claimed  # the provider claims the audited weights
    try:
        G.wrap_generate(model, log)
    finally:
        G.served_weights = real
    tok = byte_tokenizer(padding_side="left")
    settings = dict(SAMPLED) if sample else {"do_sample": False}
    for i in range(0, len(prompts), batch):
        enc = tok(list(prompts[i : i + batch]), return_tensors="pt", padding=True)
        cache = {"cache": RoundedCache(torch.bfloat16 if kind == "kv_bf16" else torch.float16)} if kind.startswith("kv_") else {}
        with _lying_sampler(kind), torch.inference_mode():
            model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **settings, **cache)
    model.aftune_log.publish()
