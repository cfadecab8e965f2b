"""Signed roots: the provider's Ed25519 signature over what a trace or inference log commits.

The signature is a DSSE envelope (``signature.dsse.json`` beside ``root.json``) whose payload is an
in-toto Statement v1: subject = the root (BLAKE3), predicate = the contract digest, run id, number
of steps or calls, and the Hub repository and commit when it was pushed. Envelope, PAE encoding
and key ids come from ``securesystemslib`` (the library behind in-toto and TUF; it works offline,
unlike Sigstore's keyless flow); keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public).

Example:
    >>> write_keypair("provider.key")                                   # doctest: +SKIP
    >>> sign_root("runs/trace", "provider.key")                         # doctest: +SKIP
    >>> check_signature("runs/trace", "provider.key.pub", root=..., contract_digest=...)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import digest as D
from .errors import CommitmentError, ConfigError
from .safeio import atomic_write_bytes, loads_json_strict, read_regular_file
from .trace.layout import ROOT, SIGNATURE

__all__ = ["SIGNATURE", "check_signature", "public_key", "sign_root", "statement", "write_keypair"]

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://github.com/aftune-hf/aftune_hf/attestation/root/v1"
MAX_BYTES = 64 * 1024
KINDS = {"aftune-trace": ("trace_root", "num_steps"), "aftune-inference": ("log_root", "num_calls")}


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from securesystemslib.dsse import Envelope
        from securesystemslib.signer import CryptoSigner, SSlibKey
    except ImportError as e:  # pragma: no cover - both are dependencies
        raise ConfigError("missing_dependency", f"signing needs securesystemslib[crypto]: {e}") from None
    return serialization, Envelope, CryptoSigner, SSlibKey


def write_keypair(path: str | os.PathLike[str], *, force: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 key: ``path`` (private, mode 0600) and ``path.pub``; returns both."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    serialization = _crypto()[0]
    private, public = Path(path), Path(f"{path}.pub")
    if not force and (private.exists() or public.exists()):
        raise ConfigError("file_exists", "refusing to overwrite a key (pass --force)", path=str(private))
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write_bytes(private, pem)
    os.chmod(private, 0o600)
    atomic_write_bytes(public, pub)
    return private, public


def _signer(path: str | os.PathLike[str]):
    serialization, _, CryptoSigner, _ = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError("invalid_key", f"not a PEM private key: {e}", path=str(path)) from None
    return CryptoSigner(key)


def public_key(path: str | os.PathLike[str]):
    """The ``securesystemslib`` key of a PEM public key file (or of a private key's public half)."""
    serialization, _, _, SSlibKey = _crypto()
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError("invalid_key", f"cannot read the key: {e.strerror}", path=str(path)) from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError):
            raise ConfigError("invalid_key", "not a PEM public key", path=str(path)) from None
    return SSlibKey.from_crypto(key)


def statement(root: Mapping[str, Any], *, contract_digest: str | None = None, repo: str | None = None,
              commit: str | None = None) -> dict[str, Any]:  # fmt: skip
    """The in-toto Statement for a trace's or inference log's root record (an inference root names
    no contract: pass the one its calls were served under)."""
    kind = root.get("format")
    if kind not in KINDS:
        raise ConfigError("not_sealed", f"not an aftune root record (format {kind!r})")
    root_key, count_key = KINDS[kind]
    contract_digest = root.get("contract_digest", contract_digest)
    if contract_digest is None:
        raise ConfigError("usage", "an inference log is signed for a contract: pass --contract")
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": kind, "digest": {"blake3": root[root_key]}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {"format": kind, "run_id": root["run_id"], "contract_digest": contract_digest,
                      count_key: root[count_key], "repo": repo, "commit": commit},  # fmt: skip
    }


def sign_root(directory: str | os.PathLike[str], key: str | os.PathLike[str], *, contract_digest: str | None = None,
              repo: str | None = None, commit: str | None = None) -> Path:  # fmt: skip
    """Sign a sealed trace's root (or an inference log's newest root, for ``contract_digest``) and
    write the envelope beside it; returns its path."""
    _, Envelope, _, _ = _crypto()
    directory = Path(directory)
    root = _latest_root(directory)
    if contract_digest is None and root.get("format") == "aftune-inference" and (directory / SIGNATURE).is_file():
        contract_digest = _signed(directory).get("predicate", {}).get("contract_digest")  # re-signed on push
    stmt = statement(root, contract_digest=contract_digest, repo=repo, commit=commit)
    env = Envelope(payload=D.canonical_json(stmt), payload_type=PAYLOAD_TYPE, signatures={})
    env.sign(_signer(key))
    out = directory / SIGNATURE
    atomic_write_bytes(out, D.canonical_json(env.to_dict()))
    return out


def _envelope_json(directory: Path) -> Any:
    return loads_json_strict(read_regular_file(directory, SIGNATURE, max_bytes=MAX_BYTES), path=SIGNATURE)


def _signed(directory: Path) -> dict[str, Any]:
    """The statement in our own earlier envelope (unverified: only to carry its contract over)."""
    _, Envelope, _, _ = _crypto()
    try:
        return loads_json_strict(Envelope.from_dict(_envelope_json(directory)).payload, path=SIGNATURE)
    except Exception:  # noqa: BLE001
        return {}


def _latest_root(directory: Path) -> Mapping[str, Any]:
    if (directory / ROOT).is_file():
        return json.loads((directory / ROOT).read_text(encoding="utf-8"))
    roots = sorted((directory / "roots").glob("*/root-*.json")) if (directory / "roots").is_dir() else []
    if not roots:
        raise ConfigError("not_sealed", "no root to sign: finish the trace (or publish an inference root) first",
                          path=str(directory))  # fmt: skip
    return json.loads(roots[-1].read_text(encoding="utf-8"))


def check_signature(directory: str | os.PathLike[str], signer: str | os.PathLike[str], *, root: bytes,
                    contract_digest: str | None, count: int) -> dict[str, Any]:  # fmt: skip
    """Check the envelope in ``directory`` against the client's pinned public key and what the
    verifier derived itself (root, contract digest, steps or calls); returns the statement.

    Raises:
        CommitmentError: ``signature_missing``, ``signature_invalid`` or ``signature_mismatch``.
    """
    _, Envelope, _, _ = _crypto()
    key = public_key(signer)
    path = Path(directory) / SIGNATURE
    if not path.is_file():
        raise CommitmentError("signature_missing", f"no {SIGNATURE}: the provider did not sign this root", path=SIGNATURE)
    try:
        env = Envelope.from_dict(_envelope_json(Path(directory)))
        if env.payload_type != PAYLOAD_TYPE:
            raise ValueError(f"payload type {env.payload_type!r}")
        env.verify([key], 1)
        stmt = loads_json_strict(env.payload, path=SIGNATURE)
    except CommitmentError:
        raise
    except Exception as e:  # noqa: BLE001 - any malformed or unverifiable envelope is the provider's fault
        raise CommitmentError("signature_invalid", f"not signed by the pinned key {key.keyid[:16]}…: "
                              f"{type(e).__name__}: {e}", path=SIGNATURE) from None  # fmt: skip
    want = {"subject": root.hex(), "contract_digest": contract_digest, "count": count}
    try:
        pred = stmt["predicate"]
        have = {"subject": stmt["subject"][0]["digest"]["blake3"], "contract_digest": pred["contract_digest"],
                "count": pred.get("num_steps", pred.get("num_calls"))}  # fmt: skip
        ok = stmt["_type"] == STATEMENT_TYPE and stmt["predicateType"] == PREDICATE_TYPE and len(stmt["subject"]) == 1
    except (KeyError, IndexError, TypeError):
        ok, have = False, {}
    if not ok or have != want:
        diff = ", ".join(f"{k}: signed {have.get(k)!r}, derived {v!r}" for k, v in want.items() if have.get(k) != v)
        raise CommitmentError("signature_mismatch", f"the signed statement is not about this root ({diff or 'malformed'})",
                              path=SIGNATURE)  # fmt: skip
    return stmt
