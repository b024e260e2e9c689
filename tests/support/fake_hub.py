"""A loopback HTTP server that answers the few Hugging Face Hub API calls `HfFileSystem` makes to read a
dataset repo (repo info, tree listing, paths-info, ranged file downloads), serving local folders.

The Hub cannot be reached from the tests; this lets the real `huggingface_hub.HfFileSystem` (its path
parsing, revisions, listing, ranged reads, token header) run against a known repo. It implements only
what reading needs, as the Hub documents it; uploads, commits and xet storage are not here.

    with fake_hub({"me/cache": "/path/to/cache"}, revisions={"v1"}) as hub:
        open_cache("hf://datasets/me/cache@v1", storage_options={"endpoint": hub.endpoint, "token": "t"})
        hub.requests   # [(method, path, authorization header), ...]
"""

import hashlib
import json
import os
import re
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

SHA = "0" * 39 + "1"


class _Hub:
    def __init__(self, repos: dict[str, str], revisions: set[str]):
        self.repos, self.revisions, self.requests = repos, {"main", SHA, *revisions}, []
        self.endpoint = ""

    def entry(self, repo: str, rel: str) -> dict | None:
        full = os.path.join(self.repos[repo], rel)
        if os.path.isdir(full):
            return {"type": "directory", "oid": hashlib.sha1(rel.encode()).hexdigest(), "size": 0, "path": rel}
        if os.path.isfile(full):
            with open(full, "rb") as f:
                oid = hashlib.sha1(f.read()).hexdigest()
            return {"type": "file", "oid": oid, "size": os.path.getsize(full), "path": rel}
        return None

    def tree(self, repo: str, rel: str, recursive: bool) -> list[dict] | None:
        root = os.path.join(self.repos[repo], rel)
        if not os.path.isdir(root):
            return None
        out = []
        for name in sorted(os.listdir(root)):
            child = f"{rel}/{name}" if rel else name
            out.append(self.entry(repo, child))
            if recursive and os.path.isdir(os.path.join(root, name)):
                out += self.tree(repo, child, True)
        return out


def _handler(hub: _Hub):
    api = re.compile(r"^/api/datasets/(?P<repo>[^/]+/[^/]+)(?:/(?P<op>revision|tree|paths-info)/(?P<rev>[^/]+)"
                     r"(?:/(?P<rel>.*))?)?$")
    resolve = re.compile(r"^/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<rel>.+)$")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _json(self, value, status=200):
            body = json.dumps(value).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _missing(self, what: str, code: str):
            self.send_response(404)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", what)
            body = json.dumps({"error": what}).encode()
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _route(self, method: str):
            url = urlparse(self.path)
            path = unquote(url.path)
            hub.requests.append((method, path, self.headers.get("authorization")))
            m = api.match(path) or resolve.match(path)
            if m is None or m["repo"] not in hub.repos:
                return self._missing("Repository not found", "RepoNotFound")
            rev = m.groupdict().get("rev") or "main"
            if rev not in hub.revisions:
                return self._missing("Invalid rev id", "RevisionNotFound")
            repo, rel = m["repo"], (m.groupdict().get("rel") or "").strip("/")
            op = m.groupdict().get("op")
            if m.re is resolve:
                return self._file(repo, rel)
            if op in (None, "revision"):
                return self._json({"id": repo, "sha": SHA, "private": False, "siblings": []})
            if op == "tree":
                listing = hub.tree(repo, rel, parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true")
                return self._missing("Entry not found", "EntryNotFound") if listing is None else self._json(listing)
            length = int(self.headers.get("content-length") or 0)
            form = self.rfile.read(length).decode()
            if self.headers.get("content-type", "").startswith("application/json"):
                paths = json.loads(form).get("paths", [])
            else:
                paths = parse_qs(form).get("paths", [])
            return self._json([e for p in paths if (e := hub.entry(repo, p.strip("/")))])

        def _file(self, repo: str, rel: str):
            full = os.path.join(hub.repos[repo], rel)
            if not os.path.isfile(full):
                return self._missing("Entry not found", "EntryNotFound")
            with open(full, "rb") as f:
                data = f.read()
            size, rng = len(data), self.headers.get("range")
            status, start, end = 200, 0, size
            if rng:
                a, _, b = rng.removeprefix("bytes=").partition("-")
                start, end, status = int(a), min(int(b) + 1 if b else size, size), 206
            body = data[start:end]
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", SHA)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self):
            self._route("GET")

        def do_HEAD(self):
            self._route("HEAD")

        def do_POST(self):
            self._route("POST")

    return Handler


@contextmanager
def fake_hub(repos: dict[str, str], *, revisions: set[str] = frozenset()):
    """Serve `repos` ({"owner/name": local folder}) as dataset repos on 127.0.0.1; yields the hub
    (`endpoint`, `requests`)."""
    hub = _Hub(repos, set(revisions))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()


class LocalHub:
    """A stand-in for `huggingface_hub.HfApi` that 'uploads' into a local folder (the network is not here).

    It applies `ignore_patterns` as the hub client does, so the folder is what the repo would hold.
    """

    def __init__(self, root):
        self.root, self.calls = root, []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, *, folder_path, repo_id, ignore_patterns, **kw):
        import fnmatch
        import shutil

        self.calls.append(("upload_folder", repo_id, kw))
        for d, _, files in os.walk(folder_path):
            for f in files:
                rel = os.path.relpath(os.path.join(d, f), folder_path)
                if not any(fnmatch.fnmatch(rel, p) for p in ignore_patterns):
                    os.makedirs(os.path.dirname(os.path.join(self.root, rel)) or self.root, exist_ok=True)
                    shutil.copy(os.path.join(d, f), os.path.join(self.root, rel))
