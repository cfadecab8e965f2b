"""Committed inference: a wrapped ``model.generate`` that appends a verifiable record per call.

For each call it commits the prompt and output tokens of every row, the decoding settings that
change the output, digests of the weights that served it, and per generated token the value of
the largest-magnitude entry of the final hidden state (4 bytes per token, 128 bytes per 32
tokens; the verifier finds the entry itself). Greedy calls are untouched. Sampled calls draw each token by inverse-CDF from a
uniform derived from a committed seed (:func:`aftune_hf.digest.uniform`) over the distribution
``generate`` itself would sample from (same processors and warpers, same order), so a verifier
can check every sampled token, not only greedy ones.

Example:
    >>> from aftune_hf.generate import wrap_generate
    >>> model = wrap_generate(model, "runs/inference-log")                   # doctest: +SKIP
    >>> out = model.generate(**tok(prompts, return_tensors="pt", padding=True),
    ...                      max_new_tokens=64, do_sample=True, temperature=0.7)   # doctest: +SKIP
    >>> model.aftune_log.publish()["log_root"]                               # doctest: +SKIP
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import digest as D
from .artifacts import TRAINING_ONLY_CONFIG_KEYS, architecture_config
from .errors import ConfigError
from .live import unwrap
from .records import CALL_CONFIG_KEYS
from .trace.inference import InferenceLogWriter

# Decoding options a verifier can re-check are records.CALL_CONFIG_KEYS; anything else that changes
# the output is refused.
_REFUSED = {"num_beams": 1, "num_beam_groups": 1, "penalty_alpha": None, "no_repeat_ngram_size": 0,
            "bad_words_ids": None, "force_words_ids": None, "typical_p": 1.0, "epsilon_cutoff": 0.0,
            "eta_cutoff": 0.0, "top_h": None, "encoder_repetition_penalty": 1.0, "sequence_bias": None,
            "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
            "forced_eos_token_id": None, "exponential_decay_length_penalty": None, "renormalize_logits": False,
            "watermarking_config": None, "min_length": 0, "prompt_lookup_num_tokens": None}  # fmt: skip


def decoding_config(model: Any, kwargs: Mapping[str, Any]) -> Any:
    """The effective ``GenerationConfig`` of a call (model defaults updated by the call's kwargs)."""
    gc = copy.deepcopy(kwargs.get("generation_config") or unwrap(model).generation_config)
    gc.update(**{k: v for k, v in kwargs.items() if hasattr(gc, k)})
    for key, neutral in _REFUSED.items():
        value = getattr(gc, key, neutral)
        if value not in (neutral, None) and not (key in ("typical_p",) and value == 1.0):
            raise ConfigError("unsupported_decoding", f"{key}={value!r} cannot be verified; use the defaults")
    if kwargs.get("logits_processor") or kwargs.get("stopping_criteria") or kwargs.get("assistant_model"):
        raise ConfigError("unsupported_decoding", "custom processors, stopping criteria or assistants are not verifiable")
    if gc.max_new_tokens is None:
        raise ConfigError("unsupported_decoding", "set max_new_tokens")
    return gc


def canonical_config(gc: Any) -> dict[str, Any]:
    """The committed decoding settings (floats as exact hex)."""
    out: dict[str, Any] = {}
    for k in CALL_CONFIG_KEYS:
        v = getattr(gc, k, None)
        if isinstance(v, torch.Tensor):
            v = v.tolist()
        if isinstance(v, list):
            v = v[0] if len(v) == 1 else None if not v else ConfigError("unsupported_decoding", "one eos token only")
            if isinstance(v, ConfigError):
                raise v
        out[k] = D.encode_float(v) if isinstance(v, float) else v
    if not out["do_sample"]:
        out.update(temperature=None, top_k=None, top_p=None, min_p=None)
    return out


def warpers(config: Mapping[str, Any]) -> list[Any]:
    """The sampling warpers ``generate`` applies for ``config``, in its order."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )  # fmt: skip

    f = {k: D.decode_float(v) if isinstance(v, str) else v for k, v in config.items()}
    out: list[Any] = []
    if f["temperature"] is not None and f["temperature"] != 1.0:
        out.append(TemperatureLogitsWarper(f["temperature"]))
    if f["top_k"] not in (None, 0):
        out.append(TopKLogitsWarper(top_k=f["top_k"]))
    if f["top_p"] is not None and f["top_p"] < 1.0:
        out.append(TopPLogitsWarper(top_p=f["top_p"]))
    if f["min_p"] is not None:
        out.append(MinPLogitsWarper(min_p=f["min_p"]))
    return out


def sampling_cdf(scores: torch.Tensor, input_ids: torch.Tensor, config: Mapping[str, Any]) -> torch.Tensor:
    """Cumulative distribution (float64, per row) after the warpers, from processed scores."""
    s = scores.float()
    for w in warpers(config):
        s = w(input_ids, s)
    return torch.softmax(s.double(), dim=-1).cumsum(-1)


class _InverseCdfSampler:
    """The last logits processor of a sampled call: picks each token from a committed uniform."""

    def __init__(self, config: Mapping[str, Any], seed: bytes, prompt_len: int) -> None:
        self.config, self.seed, self.prompt_len = config, seed, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        position = input_ids.shape[1] - self.prompt_len
        cdf = sampling_cdf(scores, input_ids, self.config)  # every row at once (the warpers work per row)
        u = torch.tensor([D.uniform(self.seed, row, position) for row in range(scores.shape[0])], dtype=cdf.dtype,
                         device=cdf.device)[:, None] * cdf[:, -1:]  # fmt: skip
        tokens = torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens, 0.0)


def served_weights(model: Any) -> dict[str, str | None]:
    """Digests of the weights serving the calls: every parameter, the architecture, the adapter."""
    m = unwrap(model)
    named = dict(m.named_parameters())
    base = m.get_base_model() if hasattr(m, "get_base_model") else m
    adapter = {n: p for n, p in named.items() if "lora_" in n}
    return {
        "params": D.state_digest(named).hex(),
        "model": D.json_digest(architecture_config(_architecture(base.config))).hex(),
        "adapter": D.state_digest(adapter).hex() if adapter else None,
    }


_RUNTIME_CONFIG_KEYS = TRAINING_ONLY_CONFIG_KEYS | {"output_attentions", "output_hidden_states", "return_dict", "dtype",
                                                    "torch_dtype"}  # fmt: skip


def _architecture(config: Any) -> dict[str, Any]:
    """A model config without its runtime switches and training-only fields (the Trainer flips
    ``use_cache``; a recipe's dropout is not in the served model's ``config.json``): what an
    eval-mode forward pass depends on."""
    return {k: v for k, v in config.to_dict().items() if k not in _RUNTIME_CONFIG_KEYS}


def wrap_generate(model: Any, log: InferenceLogWriter | str | Path) -> Any:
    """Make ``model.generate`` commit every call to ``log``; returns ``model`` (same object).

    The signature and return value of ``generate`` are unchanged; ``model.aftune_log`` is the
    :class:`~aftune_hf.trace.inference.InferenceLogWriter` (call ``publish()`` to cut a root).
    Weights are digested once here: re-wrap after changing them.
    """
    writer = log if isinstance(log, InferenceLogWriter) else InferenceLogWriter(log)
    weights = served_weights(model)
    head = unwrap(model).get_output_embeddings()
    original = model.generate
    state: dict[str, Any] = {"active": False, "value": []}

    def capture(_module: Any, args: tuple) -> None:
        if state["active"]:
            h = args[0][:, -1, :].detach().float()
            state["value"].append(h.gather(-1, h.abs().argmax(-1, keepdim=True))[:, 0].cpu())

    head.register_forward_pre_hook(capture)

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any) -> Any:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ConfigError("unsupported_call", "pass input_ids as a [batch, length] tensor")
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask
        gc = decoding_config(model, kwargs)
        config = canonical_config(gc)
        call_kwargs = dict(kwargs)
        seed = None
        if config["do_sample"]:
            seed = os.urandom(32)
            sampler = _InverseCdfSampler(config, seed, input_ids.shape[1])
            from transformers import LogitsProcessorList

            call_kwargs.update(temperature=1.0, top_k=0, top_p=1.0, min_p=None,
                               logits_processor=LogitsProcessorList([sampler]))  # fmt: skip
        state.update(active=True, value=[])
        try:
            out = original(*args, **call_kwargs)
        finally:
            state["active"] = False
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        new = sequences[:, input_ids.shape[1] :].cpu()
        value = torch.stack(state["value"], 1) if state["value"] else torch.zeros(len(new), 0)
        tensors = {}
        for r in range(new.shape[0]):
            length = _output_length(new[r], config["eos_token_id"])
            tensors[f"prompt.{r}"] = input_ids[r][mask[r].bool()].cpu().to(torch.int64)
            tensors[f"output.{r}"] = new[r, :length].to(torch.int64).contiguous()
            tensors[f"act_value.{r}"] = value[r, :length].contiguous()
        writer.append(tensors, rows=new.shape[0], config=config, weights=weights, seed=seed)
        return out

    model.generate = generate
    model.aftune_log = writer
    return model


def _output_length(tokens: torch.Tensor, eos: int | None) -> int:
    """Generated tokens up to and including the first EOS (the rest is padding)."""
    if eos is not None:
        hits = (tokens == eos).nonzero()
        if len(hits):
            return int(hits[0, 0]) + 1
    return int(tokens.shape[0])
