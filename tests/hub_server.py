"""A minimal Hugging Face Hub server for tests, on loopback only.

No maintained package serves the Hub protocol that ``huggingface_hub`` 2.x speaks, so this
module implements just the endpoints ``create_repo``, ``create_branch``, ``create_commit``
(regular files inlined in the NDJSON commit), ``repo_info``, ``list_repo_tree`` and
``hf_hub_download`` (HEAD + GET with Range) call, with the headers the client reads
(``X-Repo-Commit``, ``X-Linked-Etag``, ``X-Linked-Size``, ``X-Error-Code``). Repos live in
memory. It is a test double of the *server*: the client under test is the real library.

Fault injection: ``drop_once[path] = n`` makes the next GET of ``path`` send ``n`` bytes of
the body and then close the connection, as a flaky network would; ``fail_once[path] = status``
answers the next GET of ``path`` with that HTTP error. ``require_token`` makes
private repos answer 401 unless ``Authorization: Bearer <token>`` is sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    def __init__(self, private: bool):
        self.private = private
        self.commits: dict[str, dict[str, bytes]] = {}
        self.refs: dict[str, str] = {}
        empty = self._commit({}, "initial commit")
        self.refs["main"] = empty

    def _commit(self, files: dict[str, bytes], message: str) -> str:
        sha = hashlib.sha1(f"{time.time_ns()}{message}{sorted(files)}".encode()).hexdigest()
        self.commits[sha] = files
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


class HubState:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.drop_once: dict[str, int] = {}
        self.fail_once: dict[str, int] = {}
        self.require_token: str | None = None
        self.requests: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()


    def seed(self, repo_id: str, folder, private: bool = False) -> None:
        """Create ``repo_id`` holding the files of ``folder`` (server side, as another uploader would)."""
        from pathlib import Path

        repo = Repo(private=private)
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}
        repo.refs["main"] = repo._commit(files, "seed")
        with self.lock:
            self.repos[repo_id] = repo


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "HubServer"

    def log_message(self, *args):  # quiet
        pass

    # ---------------------------------------------------------------- helpers
    @property
    def state(self) -> HubState:
        return self.server.state

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None):
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str | None, message: str, head: bool = False):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        body = json.dumps({"error": message}).encode()
        self._send(status, body, {"Content-Type": "application/json", **headers}, head=head)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _repo(self, repo_id: str, head: bool = False) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        token = self.state.require_token
        authorized = token is None or self.headers.get("Authorization") == f"Bearer {token}"
        if repo is None or (repo.private and not authorized):
            self._error(401 if not authorized else 404, "RepoNotFound", f"Repository {repo_id} not found", head)
            return None
        return repo

    # ---------------------------------------------------------------- routing
    def do_HEAD(self):
        self._route("HEAD")

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def _route(self, method: str):
        url = urlparse(self.path)
        path = unquote(url.path)
        with self.state.lock:
            self.state.requests.append((method, path, self.headers.get("Range")))
        parts = path.strip("/").split("/")
        try:
            if method == "POST" and path == "/api/repos/create":
                return self._create_repo(json.loads(self._body()))
            if method == "POST" and path == "/api/validate-yaml":
                self._body()
                return self._json(200, {"errors": [], "warnings": []})
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id = f"{parts[2]}/{parts[3]}"
                rest = parts[4:]
                if method == "POST" and rest[:1] == ["preupload"]:
                    return self._preupload(repo_id)
                if method == "POST" and rest[:1] == ["commit"]:
                    return self._commit(repo_id, "/".join(rest[1:]) or "main")
                if method == "POST" and rest[:1] == ["branch"]:
                    return self._branch(repo_id, "/".join(rest[1:]))
                if method == "GET" and not rest:
                    return self._info(repo_id, "main")
                if method == "GET" and rest[:1] == ["revision"]:
                    return self._info(repo_id, "/".join(rest[1:]))
                if method == "GET" and rest[:1] == ["tree"]:
                    return self._tree(repo_id, rest[1] if len(rest) > 1 else "main")
            if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), method == "HEAD")
            self._error(404, None, f"no route for {method} {path}", head=method == "HEAD")
        except (BrokenPipeError, ConnectionResetError):
            pass

    # ---------------------------------------------------------------- endpoints
    def _create_repo(self, payload: dict):
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        with self.state.lock:
            if repo_id in self.state.repos:
                return self._error(409, None, "You already created this model repo")
            self.state.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        self._json(200, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})

    def _preupload(self, repo_id: str):
        payload = json.loads(self._body())
        if self._repo(repo_id) is None:
            return
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                 for f in payload["files"]]
        self._json(200, {"files": files})

    def _branch(self, repo_id: str, branch: str):
        self._body()
        repo = self._repo(repo_id)
        if repo is None:
            return
        if branch in repo.refs:
            return self._error(409, None, "Reference already exists")
        repo.refs[branch] = repo.refs["main"]
        self._json(200, {})

    def _commit(self, repo_id: str, revision: str):
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        repo = self._repo(repo_id)
        if repo is None:
            return
        with self.state.lock:
            parent = repo.resolve(revision)
            if parent is None or revision not in repo.refs:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            files = dict(repo.commits[parent])
            message = "commit"
            for item in lines:
                value = item["value"]
                if item["key"] == "header":
                    message = value.get("summary", message)
                elif item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "deletedFile":
                    files.pop(value["path"], None)
                else:
                    return self._error(400, None, f"unsupported commit operation {item['key']}")
            sha = repo._commit(files, message)
            repo.refs[revision] = sha
        host = self.headers["Host"]
        self._json(200, {"commitUrl": f"http://{host}/{repo_id}/commit/{sha}", "commitOid": sha,
                         "success": True})

    def _revision(self, repo_id: str, revision: str):
        """``(repo, commit sha)``, or None after answering 404 for an unknown repo or revision."""
        repo = self._repo(repo_id)
        if repo is None:
            return None
        sha = repo.resolve(revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo, sha

    def _info(self, repo_id: str, revision: str):
        found = self._revision(repo_id, revision)
        if found is None:
            return
        repo, sha = found
        self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                         "siblings": [{"rfilename": name} for name in sorted(repo.commits[sha])]})

    def _tree(self, repo_id: str, revision: str):
        found = self._revision(repo_id, revision)
        if found is None:
            return
        repo, sha = found
        entries = [{"type": "file", "path": name, "size": len(data), "oid": _git_blob_sha(data)}
                   for name, data in sorted(repo.commits[sha].items())]
        self._json(200, entries)

    def _resolve(self, repo_id: str, revision: str, filename: str, head: bool):
        repo = self._repo(repo_id, head=head)
        if repo is None:
            return
        sha = repo.resolve(revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
        data = repo.commits[sha].get(filename)
        if data is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist at {revision}", head)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{_git_blob_sha(data)}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        start = 0
        status = 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and not head:
            start = int(rng[len("bytes="):].split("-")[0] or 0)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if head:
            return self._send(200, b"", {**headers, "Content-Length": str(len(data))}, head=True)
        with self.state.lock:
            cut = self.state.drop_once.pop(filename, None)
            fail = self.state.fail_once.pop(filename, None)
        if fail is not None:
            return self._error(fail, None, "injected server error")
        if cut is not None:  # send a part of the body, then drop the connection
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self._send(status, body, headers)


class HubServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = HubState()
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=5)
