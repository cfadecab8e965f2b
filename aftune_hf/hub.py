"""Push traces (and inference logs) to the Hugging Face Hub and pull them at a pinned revision.

Pushing returns the commit sha next to the trace root: the client pins that revision, then draws
its nonce. Pulling downloads exactly that revision, file by file (names validated, sizes bounded
first), into a private directory the strict reader then checks -- the Hub's cache layout with its
symlinks is never verified directly. Network trouble raises :class:`FetchError` (verdict ERROR);
a repository, revision or file the provider does not serve is a :class:`ManifestMismatchError`
(verdict FAIL).

Example:
    >>> result = push_trace("runs/trace", "me/tiny-lora-audit")          # doctest: +SKIP
    >>> result.commit_sha, result.trace_root                              # doctest: +SKIP
    >>> pull("me/tiny-lora-audit", result.commit_sha, "/tmp/pulled")     # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .errors import ConfigError, FetchError, ManifestMismatchError, ResourceLimitError
from .safeio import validate_relpath
from .trace import IGNORED, LOCK, Limits, TraceReader

_SHA = re.compile(r"^[0-9a-f]{40}$")
_URI = re.compile(r"^hf://(?:(?P<type>datasets|models)/)?(?P<repo>[\w.-]+(?:/[\w.-]+)?)@(?P<rev>[0-9a-f]{40})$")
IGNORE_ON_PUSH = [LOCK, "**/.*.tmp-*", ".*.tmp-*"]


@dataclass(frozen=True)
class PushResult:
    """Where a trace now lives: pin ``commit_sha``; the root it committed is ``trace_root``."""

    repo_id: str
    repo_type: str
    commit_sha: str
    trace_root: str | None

    @property
    def uri(self) -> str:
        prefix = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        return f"hf://{prefix}{self.repo_id}@{self.commit_sha}"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "uri": self.uri}


def parse_uri(uri: str) -> tuple[str, str, str]:
    """``hf://[datasets/]OWNER/NAME@COMMIT_SHA`` -> (repo_id, revision, repo_type); the revision must be a
    full commit sha (a branch name could move after the nonce is drawn)."""
    m = _URI.fullmatch(uri)
    if not m:
        raise ConfigError("invalid_uri", "expected hf://[datasets/]OWNER/NAME@<40-hex commit sha>", path=uri)
    return m["repo"], m["rev"], "dataset" if m["type"] == "datasets" else "model"


def _api(endpoint: str | None, token: str | None) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token)


MIN_RATE = 1 << 20  # bytes/s a download must average: a pull's deadline is BASE_DEADLINE + its listed bytes / MIN_RATE
BASE_DEADLINE = 120.0
READ_TIMEOUT = 30.0  # seconds without a byte before a download is given up


def _fetch(session: Any, url: str, headers: dict[str, str], size: int, target: Path, deadline: float, bar: Any) -> None:
    """Stream ``url`` into ``target``: more bytes than the listing's ``size`` is the provider's FAIL
    (stopped at ``size + 1``, never buffered), passing ``deadline`` (monotonic) an ERROR."""
    import time

    import httpx2

    part = target.with_name(f".{target.name}.part")
    got = 0
    with session.stream("GET", url, headers=headers, follow_redirects=True,
                        timeout=httpx2.Timeout(READ_TIMEOUT, connect=READ_TIMEOUT)) as r, open(part, "wb") as out:  # fmt: skip
        if r.status_code == 404:
            raise ManifestMismatchError("not_served", "the provider does not serve this file", path=target.name)
        r.raise_for_status()
        for chunk in r.iter_bytes():  # as bytes arrive: a drip must still see the deadline
            got += len(chunk)
            if got > size:
                raise ManifestMismatchError("hash_mismatch", f"the server sends more than the listed {size} bytes",
                                            path=target.name)  # fmt: skip
            out.write(chunk)
            bar.update(len(chunk))
            if time.monotonic() > deadline:
                raise FetchError("download_deadline", "the download is too slow (below 1 MB/s on average)", path=target.name)
    if got != size:
        raise ManifestMismatchError("hash_mismatch", f"served {got} bytes, the listing says {size}", path=target.name)
    part.replace(target)  # our own plain copy in the verifier's private directory


def _network_errors() -> tuple[type[BaseException], ...]:
    import httpx2

    return (httpx2.TransportError, TimeoutError, ConnectionError)


def push_trace(
    trace: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    repo_type: str = "model",
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
    check: bool = True,
    progress: bool = True,
    sign_key: str | Path | None = None,
) -> PushResult:
    """Upload a trace or inference log directory with ``huggingface_hub``; return the commit.

    With ``check`` (default) a finished training trace is integrity-checked first, so a broken trace
    is never published. An unfinished one (no ``root.json``, e.g. pushed during training) is pushed
    as it is. ``progress=False`` silences ``huggingface_hub``'s upload bars for this call. With
    ``sign_key`` the root is then signed together with the repository and that commit
    (:mod:`aftune_hf.attest`) and the signature uploaded beside it: the returned commit is that one.

    Example:
        >>> r = push_trace("runs/trace", "me/audit")            # doctest: +SKIP
        >>> r.uri                                                # doctest: +SKIP
        'hf://me/audit@0f3c...'
    """
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError("invalid_repo_id", " ".join(str(e).split())[:200], path=repo_id) from None
    path = Path(trace)
    root = None
    if check and (path / "root.json").exists():
        root = TraceReader(path).check_integrity().trace_root.hex()
    if sign_key is not None:
        from .attest import public_key

        public_key(sign_key)  # a bad key is found before anything is uploaded
    api = _api(endpoint, token)
    try:
        with _hub_bars(progress):
            api.create_repo(repo_id, private=private, repo_type=repo_type, exist_ok=True)
            info = api.upload_folder(
                folder_path=str(path), repo_id=repo_id, repo_type=repo_type,
                commit_message=commit_message or (f"aftune trace {root}" if root else "aftune trace (in progress)"),
                ignore_patterns=IGNORE_ON_PUSH,
            )  # fmt: skip
            if sign_key is not None:
                from .attest import SIGNATURE, sign_root

                signed = sign_root(path, sign_key, repo=repo_id, commit=info.oid)
                info = api.upload_file(path_or_fileobj=str(signed), path_in_repo=SIGNATURE, repo_id=repo_id,
                                       repo_type=repo_type, commit_message=f"aftune signature of {info.oid}")  # fmt: skip
    except (HfHubHTTPError, *_network_errors()) as e:
        raise FetchError("push_failed", f"{type(e).__name__}: {str(e)[:300]}", path=repo_id) from e
    return PushResult(repo_id, repo_type, info.oid, root)


@contextlib.contextmanager
def _hub_bars(enabled: bool) -> Iterator[None]:
    """``huggingface_hub``'s own progress bars on or off for the duration (restored afterwards)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not enabled and not was_disabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            enable_progress_bars()


def pull(
    repo_id: str,
    revision: str,
    dest: str | Path,
    *,
    repo_type: str = "model",
    token: str | None = None,
    endpoint: str | None = None,
    limits: Limits = Limits(),
    progress: bool = False,
) -> Path:
    """Download every file of ``repo_id`` at commit ``revision`` into ``dest`` (a fresh directory);
    ``progress`` shows one bar over all the bytes."""
    import time

    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session
    from huggingface_hub.errors import (
        EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError,
    )  # fmt: skip

    if not _SHA.fullmatch(revision):
        raise ConfigError("invalid_revision", "pin a full 40-character commit sha", path=revision)
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=False)
    api = _api(endpoint, token)
    try:
        listing = [f for f in api.list_repo_tree(repo_id, revision=revision, repo_type=repo_type, recursive=True)
                   if hasattr(f, "size")]  # fmt: skip
        if len(listing) > limits.max_files:
            raise ResourceLimitError("too_many_files", f"{len(listing)} files", path=repo_id)
        for f in listing:
            if f.path in IGNORED:
                continue
            validate_relpath(f.path, max_depth=limits.max_depth)
            if f.size > limits.max_tensor_file_bytes:
                raise ResourceLimitError("file_too_large", f"{f.size} bytes", path=f.path)
        wanted = [f for f in listing if f.path not in IGNORED]
        total = sum(f.size for f in wanted)
        deadline = time.monotonic() + BASE_DEADLINE + total / MIN_RATE
        bar = tqdm(total=total, desc="downloading trace", unit="B", unit_scale=True, disable=not progress)
        session, headers = get_session(), build_hf_headers(token=token)
        for f in wanted:
            url = hf_hub_url(repo_id, f.path, revision=revision, repo_type=repo_type,
                             endpoint=endpoint or constants.ENDPOINT)  # fmt: skip
            target = out / f.path
            target.parent.mkdir(parents=True, exist_ok=True)
            _fetch(session, url, headers, f.size, target, deadline, bar)
        bar.close()
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        raise ManifestMismatchError("not_served", f"{type(e).__name__}: the provider does not serve this revision",
                                    path=f"{repo_id}@{revision}") from e  # fmt: skip
    except (HfHubHTTPError, *_network_errors()) as e:
        raise FetchError("download_failed", f"{type(e).__name__}: {str(e)[:300]}", path=repo_id) from e
    return out


def local_copy(
    trace: str | Path, work: Path, *, endpoint: str | None = None, token: str | None = None, progress: bool = False
) -> Path:
    """A local directory for ``trace``: itself, or a fresh pull of an ``hf://REPO@SHA`` URI."""
    if isinstance(trace, str) and trace.startswith("hf://"):
        repo_id, revision, repo_type = parse_uri(trace)
        return pull(repo_id, revision, work / "pulled", repo_type=repo_type, endpoint=endpoint, token=token,
                    progress=progress)  # fmt: skip
    return Path(trace)
