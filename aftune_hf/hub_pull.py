"""Reading a trace from the Hub at a pinned revision: the listing first, then only the files asked for.

:class:`RemoteFiles` lists a revision once (names validated, sizes and count bounded) and
downloads a file into the verifier's private directory the first time a check opens it, so
verifying a 20 000-step trace fetches the header, chain, root and card plus the anchors and
checkpoints of the chosen windows -- not the whole trace. A file is streamed to at most its listed
size, under one deadline for the revision's listed bytes; the strict reader then checks each
file's digest against the root as it arrives (:class:`aftune_hf.trace.TraceReader`, ``remote=``).
:func:`pull` downloads everything (``aftune verify --processes``, inference logs).

Example:
    >>> remote = RemoteFiles("me/audit", "0f3c" * 10, "/tmp/t", endpoint="http://127.0.0.1:8000")  # doctest: +SKIP
    >>> TraceReader(remote=remote).check_integrity().num_steps                                      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .errors import ConfigError, FetchError, ManifestMismatchError, ResourceLimitError
from .report import Download
from .safeio import validate_relpath
from .trace import IGNORED, Limits

_SHA = re.compile(r"^[0-9a-f]{40}$")
MIN_RATE = 1 << 20  # bytes/s a download must average: the deadline is BASE_DEADLINE + the listed bytes / MIN_RATE
BASE_DEADLINE = 120.0
READ_TIMEOUT = 30.0  # seconds without a byte before a download is given up


def network_errors() -> tuple[type[BaseException], ...]:
    import httpx2

    return (httpx2.TransportError, TimeoutError, ConnectionError)


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str) -> Iterator[None]:
    """A repository, revision or file the provider does not serve is its FAIL; network trouble ERROR."""
    from huggingface_hub.errors import (
        EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError,
    )  # fmt: skip

    try:
        yield
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        raise ManifestMismatchError("not_served", f"{type(e).__name__}: the provider does not serve this revision",
                                    path=f"{repo_id}@{revision}") from e  # fmt: skip
    except (HfHubHTTPError, *network_errors()) as e:
        raise FetchError("download_failed", f"{type(e).__name__}: {str(e)[:300]}", path=repo_id) from e


class RemoteFiles:
    """The files of ``repo_id`` at commit ``revision``, downloaded into ``dest`` on demand.

    Attributes:
        sizes: every listed file (relative path -> size in bytes), ``.gitattributes`` left out.
        fetched: the files downloaded so far (path -> bytes).
    """

    def __init__(self, repo_id: str, revision: str, dest: str | Path, *, repo_type: str = "model",
                 token: str | None = None, endpoint: str | None = None, limits: Limits = Limits(),
                 progress: bool = False) -> None:  # fmt: skip
        from huggingface_hub import HfApi

        if not _SHA.fullmatch(revision):
            raise ConfigError("invalid_revision", "pin a full 40-character commit sha", path=revision)
        self.repo_id, self.revision, self.repo_type = repo_id, revision, repo_type
        self.token, self.endpoint = token, endpoint
        self.dest = Path(dest)
        self.dest.mkdir(parents=True, exist_ok=False)
        with _hub_errors(repo_id, revision):
            api = HfApi(endpoint=endpoint, token=token)
            listing = [f for f in api.list_repo_tree(repo_id, revision=revision, repo_type=repo_type, recursive=True)
                       if hasattr(f, "size")]  # fmt: skip
        if len(listing) > limits.max_files:
            raise ResourceLimitError("too_many_files", f"{len(listing)} files", path=repo_id)
        self.sizes: dict[str, int] = {}
        for f in listing:
            if f.path in IGNORED:
                continue
            validate_relpath(f.path, max_depth=limits.max_depth)
            if f.size > limits.max_tensor_file_bytes:
                raise ResourceLimitError("file_too_large", f"{f.size} bytes", path=f.path)
            self.sizes[f.path] = int(f.size)
        self.fetched: dict[str, int] = {}
        self.deadline = time.monotonic() + BASE_DEADLINE + sum(self.sizes.values()) / MIN_RATE
        self._session: Any = None
        self._bar = tqdm(total=0, desc="downloading trace", unit="B", unit_scale=True, disable=not progress)

    def fetch(self, rel: str) -> Path:
        """The local path of listed file ``rel``, downloaded first if it is not yet here."""
        target = self.dest / rel
        if rel in self.fetched:
            return target
        if rel not in self.sizes:
            raise ManifestMismatchError("missing_file", "the revision does not list this file", path=rel)
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session

        with _hub_errors(self.repo_id, self.revision):
            if self._session is None:
                self._session = (get_session(), build_hf_headers(token=self.token))
            session, headers = self._session
            url = hf_hub_url(self.repo_id, rel, revision=self.revision, repo_type=self.repo_type,
                             endpoint=self.endpoint or constants.ENDPOINT)  # fmt: skip
            target.parent.mkdir(parents=True, exist_ok=True)
            self._bar.total += self.sizes[rel]
            self._bar.refresh()
            _fetch(session, url, headers, self.sizes[rel], target, self.deadline, self._bar)
        self.fetched[rel] = self.sizes[rel]
        return target

    def fetch_all(self) -> Path:
        for rel in sorted(self.sizes):
            self.fetch(rel)
        self._bar.close()
        return self.dest

    def download(self) -> Download:
        """What was fetched, against what the revision holds."""
        return Download(len(self.fetched), sum(self.fetched.values()), len(self.sizes), sum(self.sizes.values()))


def _fetch(session: Any, url: str, headers: dict[str, str], size: int, target: Path, deadline: float, bar: Any) -> None:
    """Stream ``url`` into ``target``: more bytes than the listing's ``size`` is the provider's FAIL
    (stopped at ``size + 1``, never buffered), passing ``deadline`` (monotonic) an ERROR."""
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


def pull(repo_id: str, revision: str, dest: str | Path, *, repo_type: str = "model", token: str | None = None,
         endpoint: str | None = None, limits: Limits = Limits(), progress: bool = False) -> Path:  # fmt: skip
    """Download every file of ``repo_id`` at commit ``revision`` into ``dest`` (a fresh directory);
    ``progress`` shows one bar over the bytes."""
    remote = RemoteFiles(repo_id, revision, dest, repo_type=repo_type, token=token, endpoint=endpoint, limits=limits,
                         progress=progress)  # fmt: skip
    return remote.fetch_all()


def local_copy(
    trace: str | Path, work: Path, *, endpoint: str | None = None, token: str | None = None, progress: bool = False
) -> Path:
    """A local directory for ``trace``: itself, or a fresh pull of an ``hf://REPO@SHA`` URI."""
    if isinstance(trace, str) and trace.startswith("hf://"):
        from .hub import parse_uri

        repo_id, revision, repo_type = parse_uri(trace)
        return pull(repo_id, revision, work / "pulled", repo_type=repo_type, endpoint=endpoint, token=token,
                    progress=progress)  # fmt: skip
    return Path(trace)


def open_remote(trace: str, work: Path, *, endpoint: str | None = None, token: str | None = None,
                progress: bool = False) -> RemoteFiles:  # fmt: skip
    """:class:`RemoteFiles` of an ``hf://REPO@SHA`` URI, downloading into ``work / "pulled"``."""
    from .hub import parse_uri

    repo_id, revision, repo_type = parse_uri(trace)
    return RemoteFiles(repo_id, revision, work / "pulled", repo_type=repo_type, token=token, endpoint=endpoint,
                       progress=progress)  # fmt: skip
