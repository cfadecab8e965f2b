"""Argument checks shared by the ``aftune`` commands: each bad value is a one-line usage error."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import ConfigError


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "DATASETS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
              "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TQDM_DISABLE": "1",
              "PYTHONWARNINGS": "ignore"}  # fmt: skip


def quiet_libraries() -> None:
    """``--quiet``: transformers, peft, datasets and huggingface_hub print nothing but errors (set
    before they are imported; child processes inherit it)."""
    import logging
    import warnings

    os.environ.update(_QUIET_ENV)
    warnings.filterwarnings("ignore")
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # transformers reads this when imported ("Loading weights" bars)
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    for name in ("transformers", "peft", "datasets", "huggingface_hub", "accelerate", "aftune_hf"):
        logging.getLogger(name).setLevel(logging.ERROR)


def trace_dir(path: str, what: str = "trace") -> None:
    """A local TRACE / LOG argument must be a directory holding one (an empty folder, ``/`` or a
    source checkout is a usage error, not a FAIL); ``hf://`` URIs are checked when fetched."""
    from .trace import CHAIN, HEADER, ROOT
    from .trace.inference import CALLS, LOG_HEADER

    if path.startswith("hf://"):
        return
    if not os.path.isdir(path):
        raise ConfigError(f"{what.split()[0]}_not_found", "no such directory", path=path)
    names = {"trace": (HEADER, CHAIN, ROOT), "log": (LOG_HEADER, CALLS)}.get(what, (HEADER, CHAIN, ROOT, LOG_HEADER, CALLS))
    if not any(os.path.lexists(os.path.join(path, n)) for n in names):
        raise ConfigError(f"not_a_{what.split()[0]}", f"no {' / '.join(names)} here: not an aftune {what} directory", path=path)


def signer_key(path: str | None) -> None:
    if path is not None:
        from .attest import public_key

        public_key(path)  # the client's own key file: a usage error, before any work
