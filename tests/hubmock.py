"""A local Hugging Face Hub that serves model folders for download (point HF_ENDPOINT at ``url``).

Implements what huggingface_hub's download side asks for: repo info with its file list, HEAD
and GET of ``/{repo}/resolve/{revision}/{file}`` (with byte ranges), and records every request
so that tests can check which files were fetched, and when.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubMock:
    def __init__(self, repos: dict[str, Path]):
        self.repos = repos  # repo id -> folder
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, range
        self.on_get = None  # called with the file name before each file download (tests observe the disk)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.handle(self, head=True)

            def do_GET(self):
                hub.handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()

    def send(self, h, status: int, body: bytes, headers: dict, head: bool) -> None:
        h.send_response(status)
        for k, v in {"Content-Length": str(len(body)), **headers}.items():
            h.send_header(k, v)
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def handle(self, h, head: bool) -> None:
        path = h.path.split("?")[0]
        self.requests.append(("HEAD" if head else "GET", path, h.headers.get("Range")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = "/".join(parts[2:4])
            if repo not in self.repos:
                return self.send(h, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, head)
            files = sorted(p.name for p in self.repos[repo].iterdir() if p.is_file())
            if len(parts) >= 5 and parts[4] == "tree":
                tree = [{"type": "file", "path": f, "size": (self.repos[repo] / f).stat().st_size,
                         "oid": hashlib.sha1((self.repos[repo] / f).read_bytes()).hexdigest()} for f in files]
                return self.send(h, 200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, head)
            info = {"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                    "siblings": [{"rfilename": f} for f in files]}
            return self.send(h, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            file = self.repos.get(repo, Path("/nonexistent")) / name
            if not file.is_file():
                return self.send(h, 404, b"", {"X-Error-Code": "EntryNotFound"}, head)
            data = file.read_bytes()
            etag = hashlib.sha256(data).hexdigest()
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
            if name.endswith(".safetensors"):
                headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
            wanted = h.headers.get("Range")
            if wanted and not head:
                start, _, end = wanted.removeprefix("bytes=").partition("-")
                chunk = data[int(start): int(end) + 1 if end else None]
                return self.send(h, 206, chunk, {**headers, "Content-Range": f"bytes {start}-{int(start) + len(chunk) - 1}/{len(data)}"}, head)
            if not head and self.on_get is not None:
                self.on_get(name)
            return self.send(h, 200, data, headers, head)
        return self.send(h, 404, b"", {}, head)
