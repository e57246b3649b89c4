"""The smallest stand-in for the Hugging Face Hub that huggingface_hub's real client needs for model repos:
``create_repo``, ``create_commit`` / ``upload_folder`` (every file "regular": base64 in the commit, no LFS / Xet),
``repo_info``, ``list_repo_tree`` / ``list_repo_files``, ``hf_hub_download`` / ``snapshot_download``, deletions.

A commit is applied atomically, as on the Hub. Tests point the client at it with ``HF_ENDPOINT`` (subprocesses)
or ``huggingface_hub.constants.ENDPOINT`` (in-process), and inject faults into the next commits:
``fail_commits.append(("500", "checkpoint-4"))`` answers 500 to the first commit touching a path that contains
``checkpoint-4``; ``"drop"`` closes the connection without an answer; ``"429"`` rate-limits; ``"torn"`` applies the
commit without its marker file and half of its other files (an upload cut halfway, as separate commits would leave
it). Why not the ``hf-local-hub`` package: its wheel ships only a CLI that starts a separately built Go binary,
which pip does not install.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlparse

USER = "testuser"


class Repo:
    def __init__(self):
        self.files: Dict[str, bytes] = {}
        self.commits: List[Tuple[float, str, List[str]]] = []  # (time, sha, paths added or deleted)
        self.sha = hashlib.sha1(b"empty").hexdigest()


class HubStandIn:
    """``with HubStandIn() as hub: hub.endpoint``; ``hub.repos[repo_id].files`` is the repo's content."""

    def __init__(self, token: Optional[str] = None):
        self.repos: Dict[str, Repo] = {}
        self.fail_commits: List[Tuple[str, str]] = []
        self.requests: List[str] = []  # "METHOD path" of every request, for tests
        self.seen_tokens: List[str] = []
        self.token = token
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HubStandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str) -> List[str]:
        with self.lock:
            return sorted(self.repos[repo_id].files) if repo_id in self.repos else []

    # ---- the protocol ----------------------------------------------------------------------------------------
    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body=b"", headers: Optional[Dict[str, str]] = None, head: bool = False):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def _error(self, status: int, message: str):
                self._send(status, {"error": message}, {"X-Error-Message": message})

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _auth(self) -> bool:
                header = self.headers.get("Authorization", "")
                if header.startswith("Bearer "):
                    hub.seen_tokens.append(header[7:])
                if hub.token is not None and header != f"Bearer {hub.token}" and self.command != "GET" and self.command != "HEAD":
                    self._error(401, "Invalid credentials")
                    return False
                return True

            def do_POST(self):
                hub.requests.append(f"POST {self.path}")
                body = self._body()
                if not self._auth():
                    return
                path = urlparse(self.path).path
                if path == "/api/repos/create":
                    request = json.loads(body)
                    repo_id = f"{request.get('organization') or USER}/{request['name']}"
                    with hub.lock:
                        hub.repos.setdefault(repo_id, Repo())
                    return self._send(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                parts = path.split("/")  # /api/models/<ns>/<name>/<action>/<revision>
                if len(parts) < 6 or parts[1:3] != ["api", "models"]:
                    return self._error(404, "not found")
                repo_id, action = f"{parts[3]}/{parts[4]}", parts[5]
                if repo_id not in hub.repos:
                    return self._error(404, "Repository not found")
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                      for f in files]})
                if action == "commit":
                    return self._commit(repo_id, body)
                self._error(404, "not found")

            def _commit(self, repo_id: str, body: bytes):
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                added = {v["value"]["path"]: base64.b64decode(v["value"]["content"]) for v in lines if v["key"] == "file"}
                deleted = [(v["value"]["path"], v["key"] == "deletedFolder") for v in lines if v["key"] in ("deletedFile", "deletedFolder")]
                touched = list(added) + [p for p, _ in deleted]
                fault = next((f for f in hub.fail_commits if any(f[1] in p for p in touched)), None)
                if fault is not None:
                    hub.fail_commits.remove(fault)
                    if fault[0] == "drop":  # the connection goes away mid-request: no answer at all
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    if fault[0] in ("500", "429"):
                        return self._error(int(fault[0]), "injected failure")
                    if fault[0] == "torn":  # half the files and no marker made it
                        keep = sorted(p for p in added if not p.endswith("checkpoint_complete.json"))
                        added = {p: added[p] for p in keep[: len(keep) // 2]}
                with hub.lock:
                    repo = hub.repos[repo_id]
                    for path, is_folder in deleted:
                        prefix = path.rstrip("/") + "/"
                        for name in [n for n in repo.files if n == path or (is_folder and n.startswith(prefix))]:
                            del repo.files[name]
                    repo.files.update(added)
                    repo.sha = hashlib.sha1(f"{repo.sha}{sorted(touched)}{time.time()}".encode()).hexdigest()
                    repo.commits.append((time.time(), repo.sha, touched))
                    sha = repo.sha
                self._send(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha})

            def do_HEAD(self):
                self.do_GET(head=True)

            def do_GET(self, head: bool = False):
                hub.requests.append(f"{self.command} {self.path}")
                self._auth()
                url = urlparse(self.path)
                parts = [unquote(p) for p in url.path.split("/")]
                if url.path == "/api/whoami-v2":
                    return self._send(200, {"name": USER, "type": "user", "auth": {}})
                if parts[1:3] == ["api", "models"] and len(parts) >= 5:
                    repo_id = f"{parts[3]}/{parts[4]}"
                    if repo_id not in hub.repos:
                        return self._error(404, "Repository not found")
                    with hub.lock:
                        repo = hub.repos[repo_id]
                        files, sha = dict(repo.files), repo.sha
                    if len(parts) == 5 or parts[5] == "revision":
                        return self._send(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                                                "siblings": [{"rfilename": name} for name in sorted(files)]})
                    if parts[5] == "tree":
                        prefix = "/".join(parts[7:]).strip("/")
                        recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() in ("1", "true")
                        return self._send(200, tree(files, prefix, recursive))
                if len(parts) >= 5 and parts[3] == "resolve":  # /<ns>/<name>/resolve/<revision>/<path>
                    repo_id, name = f"{parts[1]}/{parts[2]}", "/".join(parts[5:])
                    with hub.lock:
                        repo = hub.repos.get(repo_id)
                        data, sha = (repo.files.get(name), repo.sha) if repo else (None, None)
                    if data is None:
                        return self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"}, head)
                    etag = f'"{hashlib.sha1(data).hexdigest()}"'
                    return self._send(200, data, {"Content-Type": "application/octet-stream", "X-Repo-Commit": sha,
                                                  "ETag": etag}, head)
                self._error(404, "not found")

        return Handler


def tree(files: Dict[str, bytes], prefix: str, recursive: bool) -> List[dict]:
    """The Hub's tree listing of ``prefix``: files (and folders) under it, all levels when ``recursive``."""
    entries, folders = [], set()
    base = prefix + "/" if prefix else ""
    for name, data in sorted(files.items()):
        if not name.startswith(base):
            continue
        rest = name[len(base):].split("/")
        for depth in range(1, len(rest)):
            if depth == 1 or recursive:
                folders.add(base + "/".join(rest[:depth]))
        if len(rest) == 1 or recursive:
            entries.append({"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()})
    return [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0} for f in sorted(folders)] + entries
