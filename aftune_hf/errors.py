"""One error hierarchy for everything aftune_hf raises.

Every error carries a short machine-readable ``code`` and optional ``path``/``step``
context; the message is built from them. Errors caused by the trace (that is, by the
provider) derive from :class:`ProviderFault`: a verifier maps them to FAIL. Errors on
the verifier's side (:class:`VerifierEnvironmentError`, :class:`FetchError`) map to
ERROR. Configuration and usage errors derive from :class:`ConfigError`.

Example:
    >>> from aftune_hf.errors import TraceFormatError, ProviderFault
    >>> err = TraceFormatError("header_too_large", "declared 10 GB", path="a.safetensors")
    >>> isinstance(err, ProviderFault), err.code
    (True, 'header_too_large')
"""

from __future__ import annotations

from typing import Any


class AftuneError(Exception):
    """Root of every error raised by aftune_hf."""

    def __init__(
        self, code: str, detail: str = "", *, path: str | None = None, step: int | None = None
    ) -> None:
        self.code = code
        self.detail = detail
        self.path = path
        self.step = step
        where = "".join(
            [f" [{path}]" if path is not None else "", f" [step {step}]" if step is not None else ""]
        )
        super().__init__(f"{code}{where}: {detail}" if detail else f"{code}{where}")

    def __reduce__(self) -> tuple[Any, ...]:  # errors cross process boundaries under accelerate
        return (_rebuild, (type(self), self.code, self.detail, self.path, self.step))


def _rebuild(cls: type[AftuneError], code: str, detail: str, path: str | None, step: int | None):
    return cls(code, detail, path=path, step=step)


class ConfigError(AftuneError, ValueError):
    """A contract, recipe or command-line argument is invalid (a usage error)."""


# --- provider-caused: a verifier reports FAIL ---------------------------------------


class ProviderFault(AftuneError):
    """The trace is malformed, unsafe, inconsistent or contradicts the contract."""


class TraceFormatError(ProviderFault):
    """A file does not parse under the strict reader (bad header, JSON, schema, version)."""


class PathSafetyError(ProviderFault):
    """A path is absolute, escapes the trace, is a symlink or a special file."""


class UnsafeContentError(ProviderFault):
    """A file type that could execute code (pickle and friends) is present."""


class ManifestMismatchError(ProviderFault):
    """A file or tensor is missing, extra, or differs from what was committed."""


class ResourceLimitError(ProviderFault):
    """An input exceeds the verifier's size limits (checked before allocating)."""


class CommitmentError(ProviderFault):
    """A hash chain, Merkle root or inclusion proof does not recompute."""


class ContractViolationError(ProviderFault):
    """The trace was recorded under a different contract than the client's."""


class ReplayMismatchError(ProviderFault):
    """A re-executed step differs from its commitment beyond the contract's tolerance."""


# --- verifier-side: a verifier reports ERROR ------------------------------------------


class VerifierEnvironmentError(AftuneError):
    """The verifier itself could not run (local disk, memory, missing dependency)."""


class ClientArtifactError(VerifierEnvironmentError):
    """The client's own base model, dataset or recipe does not match the client's contract."""


class FetchError(AftuneError):
    """A download from the Hub failed for network reasons (retryable)."""


# --- recorder-side -----------------------------------------------------------------


class RecorderError(AftuneError):
    """The recorder could not capture or persist a step; training must stop."""


class TraceLockedError(RecorderError):
    """Another recorder holds the trace directory."""


__all__ = [
    "AftuneError",
    "ClientArtifactError",
    "CommitmentError",
    "ConfigError",
    "ContractViolationError",
    "FetchError",
    "ManifestMismatchError",
    "PathSafetyError",
    "ProviderFault",
    "RecorderError",
    "ReplayMismatchError",
    "ResourceLimitError",
    "TraceFormatError",
    "TraceLockedError",
    "UnsafeContentError",
    "VerifierEnvironmentError",
]
