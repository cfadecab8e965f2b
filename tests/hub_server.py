"""A small local HTTP server that STANDS IN FOR THE HUGGING FACE HUB in tests.

There is no network here, so the real ``huggingface_hub`` client is pointed at this server on
127.0.0.1. It speaks only the subset of the Hub protocol the client uses for our flows, and keeps
everything in memory:

* ``POST /api/repos/create``                                   create a repository
* ``POST /api/validate-yaml``                                   model-card metadata check (always valid)
* ``POST /api/{models|datasets}/{repo}/preupload/{rev}``       upload modes (always "regular")
* ``POST /api/{models|datasets}/{repo}/commit/{rev}``          NDJSON commit with base64 files
* ``GET  /api/{models|datasets}/{repo}[/revision/{rev}]``      repository info (at a revision)
* ``GET  /api/{models|datasets}/{repo}/tree/{rev}[/path]``     file listing at a revision
* ``HEAD|GET /[datasets/]{repo}/resolve/{rev}/{path}``         file metadata / bytes at a revision

Commits are immutable snapshots; ``fail_commits`` makes chosen commit requests fail (an interrupted
push); ``tamper()`` lets a test play a malicious server that changes the
bytes stored under an existing commit. Not a Hub implementation: no auth, LFS, xet or pagination.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class FakeHub:
    """In-memory repositories: ``repos[(type, id)] = {"commits": {sha: files}, "main": sha}``."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], dict] = {}
        self.lock = threading.Lock()
        self.requests: list[str] = []
        self.misbehave: dict[str, str] = {}  # file path -> "extra" | "endless" | "drip" (a hostile server)
        self.fail_commits: set[int] = set()  # answer these commit requests (1-based count) with HTTP 500
        self.commits = 0
        self.log: list[tuple[str, list[str], list[str]]] = []  # every commit made: (sha, added, deleted)
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> str:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    # -- state ----------------------------------------------------------------------------------

    def create(self, repo_type: str, repo_id: str) -> None:
        with self.lock:
            if (repo_type, repo_id) not in self.repos:
                sha = hashlib.sha1(f"init {repo_type} {repo_id}".encode()).hexdigest()
                files = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
                self.repos[(repo_type, repo_id)] = {"commits": {sha: files}, "main": sha}

    def commit(self, repo_type: str, repo_id: str, revision: str, added: dict[str, bytes], deleted: list[str]) -> str:
        with self.lock:
            repo = self.repos[(repo_type, repo_id)]
            parent = repo["main"] if revision == "main" else revision
            files = dict(repo["commits"][parent])
            files.update(added)
            for path in deleted:
                files.pop(path, None)
            digest = hashlib.sha1(parent.encode())
            for path in sorted(files):
                digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
            sha = digest.hexdigest()
            repo["commits"][sha] = files
            repo["main"] = sha
            self.log.append((sha, sorted(added), sorted(deleted)))
            return sha

    def files_at(self, repo_type: str, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            return None
        sha = repo["main"] if revision == "main" else revision
        files = repo["commits"].get(sha)
        return None if files is None else (sha, files)

    def tamper(self, repo_id: str, revision: str, path: str, data: bytes, repo_type: str = "model") -> None:
        """Play a malicious server: change the bytes stored under an existing commit."""
        self.repos[(repo_type, repo_id)]["commits"][revision][path] = data


_TYPES = {"models": "model", "datasets": "dataset"}


def _git_blob_id(data: bytes) -> str:
    """The Hub lists a (non-LFS) file's git blob id: sha1 of ``blob <size>\\0`` and the bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _hostile(self, mode: str, data: bytes, headers: dict) -> None:
        """Bounded misbehaviour: 1 MiB more than listed, 64 MiB without a length, or a byte every 0.2 s for 20 s."""
        import time

        self.send_response(200)
        for k, v in headers.items():
            self.send_header(k, v)
        if mode == "extra":
            body = data + b"\0" * (1 << 20)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.end_headers()  # no Content-Length: the body ends when the connection closes
        try:
            if mode == "endless":
                for _ in range(64):
                    self.wfile.write(b"\0" * (1 << 20))
            else:
                end = time.monotonic() + 20
                while time.monotonic() < end:
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.2)
        except OSError:
            pass  # the client hung up, as it should
        self.close_connection = True

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _not_found(self, what: str, kind: str = "RepoNotFound", head: bool = False) -> None:
        self._send(404, json.dumps({"error": what}).encode(), {"X-Error-Code": kind, "Content-Type": "application/json"}, head)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    # -- routes -------------------------------------------------------------------------------------

    def do_POST(self) -> None:  # noqa: N802
        path = urlparse(self.path).path
        self.fake.requests.append(f"POST {path}")
        body = self._body()
        if path == "/api/validate-yaml":  # the client validates README.md front matter before committing
            return self._json(200, {"errors": [], "warnings": []})
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = "/".join(x for x in (payload.get("organization"), payload["name"]) if x)
            repo_type = payload.get("type") or "model"
            self.fake.create(repo_type, repo_id)
            prefix = "" if repo_type == "model" else "datasets/"
            return self._json(200, {"url": f"http://{self.headers['Host']}/{prefix}{repo_id}", "name": repo_id})
        m = re.fullmatch(r"/api/(models|datasets)/(.+)/(preupload|commit)/([^/]+)", path)
        if not m or (_TYPES[m[1]], m[2]) not in self.fake.repos:
            return self._not_found(path)
        repo_type, repo_id, action, revision = _TYPES[m[1]], m[2], m[3], unquote(m[4])
        if action == "preupload":
            files = json.loads(body)["files"]
            return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files],
                                    "commitOid": self.fake.repos[(repo_type, repo_id)]["main"]})  # fmt: skip
        self.fake.commits += 1
        if self.fake.commits in self.fake.fail_commits:
            return self._json(500, {"error": "injected failure"})
        added, deleted = {}, []
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            if item["key"] == "file":
                added[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                deleted.append(item["value"]["path"])
        sha = self.fake.commit(repo_type, repo_id, revision, added, deleted)
        host = self.headers["Host"]
        return self._json(200, {"commitUrl": f"http://{host}/{repo_id}/commit/{sha}", "commitOid": sha})

    def do_HEAD(self) -> None:  # noqa: N802
        self._get(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._get(head=False)

    def _get(self, head: bool) -> None:
        parsed = urlparse(self.path)
        path = unquote(parsed.path)
        self.fake.requests.append(f"{'HEAD' if head else 'GET'} {path}")
        info = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)", path)  # repository info: the main revision
        m = re.fullmatch(r"/api/(models|datasets)/(.+?)/(revision|tree)/([0-9a-zA-Z._-]+)(?:/(.*))?", path)
        if info:
            m = re.fullmatch(r"/api/(models|datasets)/(.+?)/(revision)/(main)()", f"{path}/revision/main")
        if m:
            found = self.fake.files_at(_TYPES[m[1]], m[2], m[4])
            if found is None:
                return self._not_found(path, "RevisionNotFound" if (_TYPES[m[1]], m[2]) in self.fake.repos else "RepoNotFound")
            sha, files = found
            if m[3] == "revision":
                return self._json(200, {"id": m[2], "sha": sha, "siblings": [{"rfilename": p} for p in sorted(files)]})
            prefix = (m[5] or "").strip("/")
            entries = [{"type": "file", "path": p, "size": len(b), "oid": _git_blob_id(b)}
                       for p, b in sorted(files.items()) if not prefix or p.startswith(prefix + "/")]  # fmt: skip
            return self._json(200, entries)
        m = re.fullmatch(r"/(datasets/)?(.+?)/resolve/([0-9a-zA-Z._-]+)/(.+)", path)
        if m:
            found = self.fake.files_at("dataset" if m[1] else "model", m[2], m[3])
            if found is None:
                return self._not_found(path, head=head)
            sha, files = found
            if m[4] not in files:
                return self._not_found(path, "EntryNotFound", head)
            data = files[m[4]]
            headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                       "Content-Type": "application/octet-stream"}  # fmt: skip
            if not head and m[4] in self.fake.misbehave:
                return self._hostile(self.fake.misbehave[m[4]], data, headers)
            return self._send(200, data, headers, head)
        return self._not_found(path)
