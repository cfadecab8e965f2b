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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from . import digest as D
from .dataschema import build_dataclass, plain
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
    use_dora: bool = False
    modules_to_save: tuple[str, ...] | None = None  # fully trained modules besides the adapter (a new head)
    task_type: Literal["CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION"] | None = None


@dataclass(frozen=True)
class Data:
    """How the generic recipes (:mod:`aftune_hf.recipes.generic`) read ``dataset.path`` with ``datasets``.

    ``builder`` is a ``datasets.load_dataset`` builder; ``files`` are names or globs inside
    ``dataset.path`` when it is a directory (empty: every file). One of: ``text_column`` (plain
    language modelling), ``prompt_column`` + ``response_column`` (the prompt optionally rendered
    with ``prompt_template`` and/or the tokenizer's chat template; masked out of the loss when
    ``mask_prompt``), ``messages_column`` (chat messages rendered with the chat template), or for
    classification ``text_column`` (+ ``text_pair_column``) and ``label_column``.
    """

    builder: Literal["json", "jsonl", "csv", "parquet", "text"] = "json"
    files: tuple[str, ...] = ()
    split: str = "train"
    text_column: str | None = None
    text_pair_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    messages_column: str | None = None
    prompt_template: str | None = None
    chat_template: bool = False
    mask_prompt: bool = True
    label_column: str = "label"
    num_labels: int | None = None


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
        "linear", "cosine", "constant", "constant_with_warmup", "polynomial", "cosine_with_restarts",
        "cosine_with_min_lr", "inverse_sqrt", "warmup_stable_decay",
    ] = "linear"  # options of a scheduler (min_lr_rate, ...) go in trainer_args.lr_scheduler_kwargs
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
    # layer-block cells (docs/SECURITY.md "Cells"): block boundaries over the decoder layers, 0 first and
    # num_hidden_layers last, e.g. [0, 2, 4]; each step then commits its cell table. None: no cells.
    layer_blocks: tuple[int, ...] | None = None
    cells: int = 8  # cells a challenge opens


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
    data: Data | None = None
    trainer: str = "transformers:Trainer"  # the Trainer class the provider runs and the verifier replays with
    trainer_args: Mapping[str, Any] = field(default_factory=dict)  # its own config fields (e.g. SFTConfig's)
    recipe_digest: str | None = None  # file digest of the recipe module's source (aftune digest RECIPE.py)
    name: str = ""
    aftune_contract: int = CONTRACT_VERSION
    source_dir: Path | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.aftune_contract != CONTRACT_VERSION:
            raise ConfigError("contract_version", f"unsupported version {self.aftune_contract}")
        if ":" not in self.recipe:
            raise ConfigError("invalid_recipe", f"expected 'module:function', got {self.recipe!r}")
        if ":" not in self.trainer:
            raise ConfigError("invalid_trainer", f"expected 'module:Class', got {self.trainer!r}")
        for key, v in self.recipe_args.items():
            if not isinstance(v, (str, int, float, bool)):
                raise ConfigError("invalid_recipe_args", f"recipe_args.{key} must be a scalar")
        for key, v in self.trainer_args.items():
            if not _json_value(v):
                raise ConfigError("invalid_trainer_args", f"trainer_args.{key} must be a scalar, or a list or mapping of "
                                  "scalars (lr_scheduler_kwargs, optim_args)")  # fmt: skip
        clash = sorted(set(self.trainer_args) & set(self.training_arguments_kwargs()))
        if clash:
            raise ConfigError("invalid_trainer_args", f"trainer_args may not set training fields {clash}")
        if self.recipe_digest is not None:
            Artifact("", self.recipe_digest)  # same validation as an artifact digest
        if self.peft is not None:
            _positive(self.peft.r, "peft.r")
            _positive(self.peft.lora_alpha, "peft.lora_alpha")
            if not 0 <= self.peft.lora_dropout < 1:
                raise ConfigError("invalid_value", f"peft.lora_dropout must be in [0, 1), got {self.peft.lora_dropout}")
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
        _positive(a.cells, "audit.cells")
        if a.layer_blocks is not None:
            self._check_cells()

    def _check_cells(self) -> None:
        b = self.audit.layer_blocks
        if len(b) < 2 or b[0] != 0 or any(x >= y for x, y in zip(b, b[1:])):
            raise ConfigError("invalid_audit", f"audit.layer_blocks must rise strictly from 0 to the layer count, got {list(b)}")
        why = {"mode: tolerance": self.audit.mode != "exact", "PEFT": self.is_peft, "several processes": self.training.world_size > 1,
               f"precision {self.training.precision}": self.training.precision != "fp32",
               f"trainer {self.trainer} (it computes its loss outside the model)": self.trainer.startswith("trl:")}  # fmt: skip
        refused = [k for k, v in why.items() if v]
        if refused:
            raise ConfigError("invalid_audit", f"layer-block cells are built for one-process exact fp32 full fine-tunes "
                              "whose loss is the model's own; "
                              f"not with {', '.join(refused)} (docs/SECURITY.md, Cells)")  # fmt: skip

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source_dir: Path | None = None) -> Contract:
        """Build from a parsed mapping; unknown keys and wrong types raise :class:`ConfigError`."""
        obj = build_dataclass(cls, data, "")
        return dataclasses.replace(obj, source_dir=source_dir)

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (YAML-able) of every field, including local paths."""
        return plain(self)

    # -- digest ------------------------------------------------------------------------------

    def canonical(self) -> dict[str, Any]:
        """The canonical form that is hashed: local paths dropped, floats exact, keys sorted."""
        data = plain(self)
        for art in ("base_model", "dataset"):
            data[art].pop("path")
        if data["audit"]["layer_blocks"] is None:  # a contract without cells keeps the digest it had before them
            del data["audit"]["layer_blocks"], data["audit"]["cells"]
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

    @property
    def shards(self) -> int:
        """Ranks each trainable tensor is split over (FSDP: ``trainer_args.fsdp`` set): the world size, else 1."""
        return self.training.world_size if self.trainer_args.get("fsdp") else 1

    def single_process(self) -> Contract:
        """The same job in one process: gradient accumulation over every rank's micro-batches.

        With the Trainer's seeded sampler and token-averaged loss, one process with
        ``GA x world_size`` micro-batches per step sees the same batches (rank ``r`` had micro-batches
        ``r, r + W, r + 2W, ...`` of the step) and computes the same update up to float order. FSDP
        (``trainer_args.fsdp``) averages gradients as DDP does; the one-process job is unsharded.
        """
        t = self.training
        if t.world_size == 1:
            return self
        one = dataclasses.replace(t, world_size=1, gradient_accumulation_steps=t.gradient_accumulation_steps * t.world_size)
        args = {k: v for k, v in self.trainer_args.items() if k not in ("fsdp", "fsdp_config")}  # one process: no shards
        return dataclasses.replace(self, training=one, trainer_args=args)

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

    A recipe is ``def build(contract: Contract, output_dir: str, **overrides) -> Recipe``: it must
    forward ``overrides`` to :func:`aftune_hf.recipes.common.training_arguments` (the verifier
    passes ``save_strategy="no"``, ``eval_strategy="no"``...). Built in:
    :mod:`aftune_hf.recipes.generic`; the rules for your own are in docs/RECIPES.md.

    Example:
        >>> parts = load_recipe(contract)(contract, "runs/out")                      # doctest: +SKIP
        >>> trainer = trainer_class(contract)(**parts.trainer_kwargs(), callbacks=[...])  # doctest: +SKIP
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
        raise ConfigError("contract_unreadable", e.strerror or str(e), path=str(p)) from None
    except UnicodeDecodeError:
        raise ConfigError("contract_unreadable", "not a UTF-8 text file", path=str(p)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError("contract_invalid_yaml", f"{getattr(e, 'problem', None) or 'invalid YAML'}{where}", path=str(p)) from None
    if not isinstance(data, dict):
        raise ConfigError("contract_invalid", "top level must be a mapping", path=str(p))
    return Contract.from_dict(data, source_dir=p.resolve().parent)


def load_object(spec: str, code: str) -> Any:
    """Import ``module:attribute``; a failure is :class:`ConfigError` ``code``."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ConfigError(code, f"{spec}: {e} (it must be importable here: installed, or on PYTHONPATH)") from None
    return obj


def recipe_source_digest(contract: Contract) -> str:
    """File digest (hex) of the source of the module that defines the contract's recipe."""
    import inspect

    fn = load_object(contract.recipe, "recipe_not_found")
    try:
        source = inspect.getsourcefile(inspect.getmodule(fn) or fn)
    except TypeError:
        source = None
    if not source:
        raise ConfigError("recipe_not_found", f"{contract.recipe}: no source file to digest")
    return D.file_digest(Path(source)).hex()


def load_recipe(contract: Contract) -> Callable[..., Any]:
    """Import the contract's recipe function (``module:function``), checking ``recipe_digest``.

    The function returned seeds the global RNGs with ``training.seed`` before calling the recipe,
    so new weights (an adapter, a head) are the same wherever the recipe runs.

    Raises:
        ConfigError: not importable, not callable, or its module's source is not the one the
            contract binds (``recipe_mismatch``).
    """
    import functools

    fn = load_object(contract.recipe, "recipe_not_found")
    if not callable(fn):
        raise ConfigError("recipe_not_found", f"{contract.recipe} is not callable")
    if contract.recipe_digest is not None and (have := recipe_source_digest(contract)) != contract.recipe_digest:
        raise ConfigError("recipe_mismatch", f"the recipe module's source hashes to {have}, the contract binds "
                          f"{contract.recipe_digest}: another version of {contract.recipe}")  # fmt: skip

    @functools.wraps(fn)
    def seeded(c: Contract, output_dir: str, **overrides: Any) -> Any:
        from transformers import set_seed

        set_seed(c.training.seed)
        try:
            return fn(c, output_dir, **overrides)
        except TypeError as e:
            if "unexpected keyword argument" in str(e) and any(f"'{k}'" in str(e) for k in overrides):
                raise ConfigError("recipe_signature", f"{c.recipe} must accept and forward **overrides "
                                  f"(docs/RECIPES.md): {e}") from None  # fmt: skip
            raise

    return seeded


# --- validation -----------------------------------------------------------------------------------


def _json_value(v: Any, depth: int = 0) -> bool:
    """A finite scalar, or (two levels deep at most) a list or string-keyed mapping of them."""
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, (str, int, bool)):
        return True
    if depth < 2 and isinstance(v, (list, tuple)):
        return all(_json_value(x, depth + 1) for x in v)
    if depth < 2 and isinstance(v, Mapping):
        return all(isinstance(k, str) and _json_value(x, depth + 1) for k, x in v.items())
    return False


def _positive(v: int, name: str) -> None:
    if v < 1:
        raise ConfigError("invalid_value", f"{name} must be >= 1, got {v}")
