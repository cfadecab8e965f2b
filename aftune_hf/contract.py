"""The contract: the agreed job, as a YAML file, loaded into frozen dataclasses.

Client and provider sign off the same contract. Its canonical digest
(:meth:`Contract.digest`) binds every commitment the recorder makes; the verifier takes
all policy (hyper-parameters, tolerance, window count) from the client's copy, never from
the trace. Unknown keys are an error. Two spellings of the same contract (key order,
``1e-3`` vs ``0.001``, flow vs block YAML) have the same digest. Local ``path`` fields say
where each party keeps an artifact and are *not* part of the digest; the artifact's
``digest`` is.

Example:
    >>> from aftune_hf.contract import load_contract
    >>> c = load_contract("configs/tiny-lora.yaml")          # doctest: +SKIP
    >>> c.training.learning_rate, c.audit.mode, c.digest_hex()[:8]   # doctest: +SKIP
    (0.001, 'exact', '...')
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from . import digest as D
from .errors import ConfigError

CONTRACT_VERSION = 1


@dataclass(frozen=True)
class Artifact:
    """A file or directory both parties hold: where it is here, and what it must hash to."""

    path: str
    digest: str

    def __post_init__(self) -> None:
        if len(self.digest) != 64 or any(c not in "0123456789abcdef" for c in self.digest):
            raise ConfigError("invalid_digest", f"expected 64 lowercase hex chars, got {self.digest!r}")


@dataclass(frozen=True)
class Lora:
    """PEFT LoRA adapter configuration (the fields that change the computation)."""

    r: int
    lora_alpha: int
    target_modules: tuple[str, ...]
    lora_dropout: float = 0.0
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    init_lora_weights: bool = True


@dataclass(frozen=True)
class Padding:
    """How sequences are truncated and padded into batches."""

    side: Literal["right", "left"] = "right"
    max_length: int = 128
    pad_to_multiple_of: int | None = None


@dataclass(frozen=True)
class Training:
    """Every hyper-parameter that changes the computation (names follow ``TrainingArguments``)."""

    learning_rate: float
    max_steps: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: Literal[
        "linear", "cosine", "constant", "constant_with_warmup", "polynomial", "cosine_with_restarts"
    ] = "linear"
    warmup_steps: int = 0
    seed: int = 42
    data_seed: int | None = None
    optim: Literal["adamw_torch", "adamw_torch_fused", "sgd", "adagrad"] = "adamw_torch"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    padding: Padding = field(default_factory=Padding)
    world_size: int = 1  # data-parallel processes; the global batch is per_device x GA x world_size


@dataclass(frozen=True)
class Audit:
    """What is recorded and how it is checked."""

    anchor_every: int = 4
    checkpoint_every: int = 1
    mode: Literal["exact", "tolerance"] = "exact"
    tolerance: float = 0.0
    windows: int = 4
    inference_calls: int = 8
    inference_rtol: float = 1e-4
    min_detection: float = 0.9  # a PASS must catch a provider who falsified detect_fraction of the windows this surely
    detect_fraction: float = 0.1


@dataclass(frozen=True)
class Contract:
    """The agreed job. Build it with :func:`load_contract` or :meth:`Contract.from_dict`."""

    recipe: str
    base_model: Artifact
    dataset: Artifact
    training: Training
    audit: Audit = field(default_factory=Audit)
    peft: Lora | None = None
    recipe_args: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""
    aftune_contract: int = CONTRACT_VERSION
    source_dir: Path | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.aftune_contract != CONTRACT_VERSION:
            raise ConfigError("contract_version", f"unsupported version {self.aftune_contract}")
        if ":" not in self.recipe:
            raise ConfigError("invalid_recipe", f"expected 'module:function', got {self.recipe!r}")
        for key, v in self.recipe_args.items():
            if not isinstance(v, (str, int, float, bool)) or v is None:
                raise ConfigError("invalid_recipe_args", f"recipe_args.{key} must be a scalar")
        t, a = self.training, self.audit
        _positive(t.max_steps, "training.max_steps")
        _positive(t.per_device_train_batch_size, "training.per_device_train_batch_size")
        _positive(t.gradient_accumulation_steps, "training.gradient_accumulation_steps")
        _positive(t.world_size, "training.world_size")
        _positive(a.anchor_every, "audit.anchor_every")
        _positive(a.checkpoint_every, "audit.checkpoint_every")
        _positive(a.windows, "audit.windows")
        if a.mode == "tolerance" and a.checkpoint_every != 1:
            raise ConfigError("invalid_audit", "tolerance mode needs checkpoint_every: 1")
        if not (t.learning_rate > 0 and math.isfinite(t.learning_rate)):
            raise ConfigError("invalid_value", "training.learning_rate must be positive")
        if a.tolerance < 0 or not math.isfinite(a.tolerance):
            raise ConfigError("invalid_value", "audit.tolerance must be >= 0")
        if not 0 <= a.min_detection <= 1:
            raise ConfigError("invalid_value", "audit.min_detection must be in [0, 1]")
        if not 0 < a.detect_fraction <= 1:
            raise ConfigError("invalid_value", "audit.detect_fraction must be in (0, 1]")

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source_dir: Path | None = None) -> Contract:
        """Build from a parsed mapping; unknown keys and wrong types raise :class:`ConfigError`."""
        obj = _build(cls, data, "")
        return dataclasses.replace(obj, source_dir=source_dir)

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (YAML-able) of every field, including local paths."""
        return _plain(self)

    # -- digest ------------------------------------------------------------------------------

    def canonical(self) -> dict[str, Any]:
        """The canonical form that is hashed: local paths dropped, floats exact, keys sorted."""
        data = _plain(self)
        for art in ("base_model", "dataset"):
            data[art].pop("path")
        return D.exact_floats(data)

    def digest(self) -> bytes:
        """The contract digest ``H_json(canonical())`` that every commitment binds."""
        return D.json_digest(self.canonical())

    def digest_hex(self) -> str:
        return self.digest().hex()

    # -- helpers --------------------------------------------------------------------------------

    def resolve(self, path: str) -> Path:
        """A local path from the contract, relative to the contract file's directory."""
        p = Path(path).expanduser()
        return p if p.is_absolute() or self.source_dir is None else self.source_dir / p

    @property
    def is_peft(self) -> bool:
        return self.peft is not None

    def single_process(self) -> Contract:
        """The same job in one process: gradient accumulation over every rank's micro-batches.

        With the Trainer's seeded sampler and token-averaged loss, one process with
        ``GA x world_size`` micro-batches per step sees the same batches (rank ``r`` had micro-batches
        ``r, r + W, r + 2W, ...`` of the step) and computes the same update up to float order.
        """
        t = self.training
        if t.world_size == 1:
            return self
        one = dataclasses.replace(t, world_size=1, gradient_accumulation_steps=t.gradient_accumulation_steps * t.world_size)
        return dataclasses.replace(self, training=one)

    def training_arguments_kwargs(self) -> dict[str, Any]:
        """The ``TrainingArguments`` fields the contract fixes (everything that changes the math).

        Recipes pass these to ``TrainingArguments``; the recorder compares the live Trainer's
        arguments with them.
        """
        t = self.training
        return {
            "learning_rate": t.learning_rate,
            "max_steps": t.max_steps,
            "per_device_train_batch_size": t.per_device_train_batch_size,
            "gradient_accumulation_steps": t.gradient_accumulation_steps,
            "lr_scheduler_type": t.lr_scheduler_type,
            "warmup_steps": t.warmup_steps,
            "seed": t.seed,
            "data_seed": t.data_seed,
            "optim": t.optim,
            "adam_beta1": t.adam_beta1,
            "adam_beta2": t.adam_beta2,
            "adam_epsilon": t.adam_epsilon,
            "weight_decay": t.weight_decay,
            "max_grad_norm": t.max_grad_norm,
            "bf16": t.precision == "bf16",
            "fp16": t.precision == "fp16",
        }


@dataclass(frozen=True)
class Recipe:
    """What a recipe function returns: the parts both provider and verifier build a Trainer from.

    A recipe is ``def build(contract: Contract, output_dir: str) -> Recipe``; see
    :mod:`aftune_hf.recipes.causal_lm` for the built-in one.
    """

    model: Any
    args: Any
    train_dataset: Any
    data_collator: Any
    processing_class: Any = None

    def trainer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``transformers.Trainer(**kwargs)``."""
        return {
            "model": self.model,
            "args": self.args,
            "train_dataset": self.train_dataset,
            "data_collator": self.data_collator,
            "processing_class": self.processing_class,
        }


def load_contract(path: str | Path) -> Contract:
    """Load and validate a contract YAML file.

    Raises:
        ConfigError: unreadable file, invalid YAML, unknown keys or invalid values.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError("contract_unreadable", str(e), path=str(p)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError("contract_invalid_yaml", str(e)[:300], path=str(p)) from None
    if not isinstance(data, dict):
        raise ConfigError("contract_invalid", "top level must be a mapping", path=str(p))
    return Contract.from_dict(data, source_dir=p.resolve().parent)


def load_recipe(contract: Contract) -> Callable[..., Any]:
    """Import the contract's recipe function (``module:function``)."""
    module_name, _, func_name = contract.recipe.partition(":")
    try:
        module = importlib.import_module(module_name)
        fn = getattr(module, func_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError("recipe_not_found", f"{contract.recipe}: {e}") from None
    if not callable(fn):
        raise ConfigError("recipe_not_found", f"{contract.recipe} is not callable")
    return fn


# --- dataclass (de)serialisation -----------------------------------------------------------------


def _positive(v: int, name: str) -> None:
    if v < 1:
        raise ConfigError("invalid_value", f"{name} must be >= 1, got {v}")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError("contract_invalid", f"{where or 'contract'} must be a mapping")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.name != "source_dir"}
    unknown = sorted(set(map(str, data)) - known)
    if unknown:
        raise ConfigError(
            "unknown_key", f"{', '.join(where + k for k in unknown)} (allowed: {', '.join(sorted(known))})"
        )
    kwargs = {}
    for f in fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(hints[f.name], data[f.name], where + f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError("missing_key", f"{where}{f.name} is required")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError("contract_invalid", f"{where or 'contract'}: {e}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where + ".")
    if origin is Literal:
        if value not in args:
            raise ConfigError("invalid_value", f"{where}={value!r}, expected one of {list(args)}")
        return value
    if args and type(None) in args:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError("invalid_value", f"{where} must be a non-empty list")
        return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is Mapping or tp is Mapping:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ConfigError("invalid_value", f"{where} must be a mapping with string keys")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError("invalid_value", f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError("invalid_value", f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError("invalid_value", f"{where} must be a number, got {value!r}")
        try:
            out = float(value)  # PyYAML reads '1e-3' as a string: accept numeric strings
        except (TypeError, ValueError):
            raise ConfigError("invalid_value", f"{where} must be a number, got {value!r}") from None
        if not math.isfinite(out):
            raise ConfigError("invalid_value", f"{where} must be finite")
        return out
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError("invalid_value", f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError("invalid_value", f"{where}: unsupported type {tp}")  # pragma: no cover


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj) if f.name != "source_dir"}
    if isinstance(obj, tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    return obj
