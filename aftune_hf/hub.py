"""Push traces (and inference logs) to the Hugging Face Hub and pull them at a pinned revision.

Pushing returns the commit sha next to the trace root: the client pins that revision, then draws
its nonce. A push uploads only what the Hub's newest revision lacks, in commits of at most 100
files (the Hub's recommendation), the top-level files last; an interrupted push is resumed by
running it again. Pulling (:mod:`aftune_hf.hub_pull`) downloads exactly that revision, file by file (names validated, sizes bounded
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

from .errors import ConfigError, FetchError
from .trace import HUB_MAX_FILES, IGNORED, LOCK, TraceReader

_URI = re.compile(r"^hf://(?:(?P<type>datasets|models)/)?(?P<repo>[\w.-]+(?:/[\w.-]+)?)@(?P<rev>[0-9a-f]{40})$")


@dataclass(frozen=True)
class PushResult:
    """Where a trace now lives: pin ``commit_sha``; the root it committed is ``trace_root``."""

    repo_id: str
    repo_type: str
    commit_sha: str
    trace_root: str | None
    commits: int = 1  # how many commits the push made (files go up in bounded commits)

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
    files = _local_files(path)
    if len(files) > HUB_MAX_FILES:
        raise ConfigError("too_many_files", f"{len(files)} files; a Hub repository should hold fewer than {HUB_MAX_FILES}: "
                          "record with larger audit.checkpoint_every / anchor_every", path=str(path))  # fmt: skip
    api = _api(endpoint, token)
    message = commit_message or (f"aftune trace {root}" if root else "aftune trace (in progress)")
    try:
        with _hub_bars(progress):
            api.create_repo(repo_id, private=private, repo_type=repo_type, exist_ok=True)
            sha, commits = _commit_in_batches(api, repo_id, repo_type, files, message, progress)
            if sign_key is not None:
                from .attest import SIGNATURE, sign_root

                signed = sign_root(path, sign_key, repo=repo_id, commit=sha)
                sha = api.upload_file(path_or_fileobj=str(signed), path_in_repo=SIGNATURE, repo_id=repo_id,
                                      repo_type=repo_type, commit_message=f"aftune signature of {sha}").oid  # fmt: skip
                commits += 1
    except (HfHubHTTPError, *network_errors()) as e:
        raise FetchError("push_failed", f"{type(e).__name__}: {str(e)[:300]} (run the push again: it uploads only "
                         "what the Hub does not have yet)", path=repo_id) from e  # fmt: skip
    return PushResult(repo_id, repo_type, sha, root, commits)


COMMIT_FILES = 100  # the Hub's recommended most files per commit


def _local_files(path: Path) -> dict[str, Path]:
    """The files a push publishes: every regular file but the lock, temp files and ``.gitattributes``."""
    out = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if p.is_file() and rel != LOCK and rel not in IGNORED and not (p.name.startswith(".") and ".tmp-" in p.name):
            out[rel] = p
    return out


def _commit_in_batches(api: Any, repo_id: str, repo_type: str, files: dict[str, Path], message: str,
                       progress: bool) -> tuple[str, int]:  # fmt: skip
    """Upload what the Hub's newest revision lacks (or holds other bytes of) and delete what it holds
    beyond ``files``: step files in commits of at most :data:`COMMIT_FILES`, then the top-level files
    (header, chain, card, root) in the last commit, so a revision never shows a root before its files.
    An interrupted push leaves whole commits behind; running it again skips what they uploaded.
    Returns the last commit's sha and how many commits were made."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    remote = _remote_files(api, repo_id, repo_type)
    changed = [rel for rel in sorted(files) if not _same_file(files[rel], remote.get(rel))]
    ops: list[Any] = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(files[rel])) for rel in changed if "/" in rel]
    ops += [CommitOperationDelete(path_in_repo=rel) for rel in sorted(set(remote) - set(files) - IGNORED)]
    last = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(files[rel])) for rel in changed if "/" not in rel]
    batches = [ops[i : i + COMMIT_FILES] for i in range(0, len(ops), COMMIT_FILES)] + ([last] if last else [])
    sha = None
    for i, batch in enumerate(tqdm(batches, desc="pushing trace", unit="commit", disable=not progress or len(batches) < 2)):
        note = f" ({i + 1}/{len(batches)})" if len(batches) > 1 else ""
        sha = api.create_commit(repo_id, operations=batch, commit_message=message + note, repo_type=repo_type).oid
    if sha is None:  # the Hub already holds exactly these files
        sha = api.repo_info(repo_id, repo_type=repo_type).sha
    return sha, len(batches)


def _remote_files(api: Any, repo_id: str, repo_type: str) -> dict[str, Any]:
    """The newest revision's files (path -> RepoFile), empty for a new repository."""
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    try:
        return {f.path: f for f in api.list_repo_tree(repo_id, repo_type=repo_type, recursive=True) if hasattr(f, "size")}
    except (EntryNotFoundError, RevisionNotFoundError):
        return {}


_HASHES: dict[tuple, str] = {}  # (path, size, mtime_ns, inode, kind) -> hex digest: a file is hashed once per push process


def _same_file(local: Path, remote: Any) -> bool:
    """Whether the Hub's file has the local file's bytes: its LFS sha256, else its git blob id."""
    if remote is None:
        return False
    st = local.stat()
    if st.st_size != remote.size:
        return False
    lfs = getattr(remote, "lfs", None)
    kind = "sha256" if lfs else "git"
    key = (str(local.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, kind)
    if key not in _HASHES:
        import hashlib

        h = hashlib.sha256() if lfs else hashlib.sha1(b"blob %d\0" % st.st_size)
        with open(local, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    want = (lfs["sha256"] if isinstance(lfs, dict) else lfs.sha256) if lfs else remote.blob_id
    return _HASHES[key] == want


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


from .hub_pull import RemoteFiles, local_copy, network_errors, pull  # noqa: E402,F401 - re-exported
