"""A loopback HTTP server that answers the Hugging Face Hub API calls `HfFileSystem` makes to read a
dataset repo (repo info, tree listing, paths-info, ranged file downloads), and those `HfApi.create_repo`,
`upload_folder` and `create_commit` make to write one (repo creation, preupload, commit), serving local
folders.

The Hub cannot be reached from the tests; this lets the real `huggingface_hub` client (its path parsing,
revisions, listing, ranged reads, token header, its upload pipeline's batching and resume) run against a
known repo. It implements only what those calls need, as the Hub's client expects it. Not here: LFS and
xet storage. The preupload answer makes every file a "regular" one (content inside the commit), where the
real Hub sends large and *.parquet files through xet; the client's batching into several commits and its
skipping of files the repo already holds run either way.

    with fake_hub({"me/cache": "/path/to/cache"}, revisions={"v1"}) as hub:
        open_cache("hf://datasets/me/cache@v1", storage_options={"endpoint": hub.endpoint, "token": "t"})
        hub.requests   # [(method, path, authorization header), ...]
        hub.commits    # [(summary, [paths added]), ...]
        hub.fail_commits = {2}   # the second commit from now on is refused (400), as a lost connection would end it
"""

import base64

import hashlib
import json
import os
import re
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

SHA = "0" * 39 + "1"
SIZE_CATEGORIES = ("n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M", "100M<n<1B", "1B<n<10B",
                   "10B<n<100B", "100B<n<1T", "n>1T")


class _Hub:
    def __init__(self, repos: dict[str, str], revisions: set[str]):
        self.repos, self.revisions, self.requests = repos, {"main", SHA, *revisions}, []
        self.endpoint, self.new_repos_root = "", None
        self.commits: list[tuple[str, list[str]]] = []
        self.validated: list[str] = []  # README.md texts sent to /api/validate-yaml
        self.fail_commits: set[int] = set()  # 1-based numbers of commit attempts to refuse
        self._attempts, self._lock = 0, threading.Lock()

    def git_oid(self, repo: str, rel: str) -> str | None:
        """The git blob sha1 of a regular file in the repo (what preupload reports), or None."""
        full = os.path.join(self.repos[repo], rel)
        if not os.path.isfile(full):
            return None
        with open(full, "rb") as f:
            data = f.read()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def commit(self, repo: str, lines: list[dict]) -> bool:
        """Apply one ndjson commit; False when this attempt is to be refused (nothing written)."""
        with self._lock:
            self._attempts += 1
            if self._attempts in self.fail_commits:
                return False
            header = next(line["value"] for line in lines if line["key"] == "header")
            added = []
            for line in lines:
                if line["key"] == "file":
                    value = line["value"]
                    rel = os.path.normpath(value["path"])
                    assert not rel.startswith("..") and not os.path.isabs(rel), rel
                    full = os.path.join(self.repos[repo], rel)
                    os.makedirs(os.path.dirname(full), exist_ok=True)
                    with open(full + ".partial", "wb") as f:
                        f.write(base64.b64decode(value["content"]))
                    os.replace(full + ".partial", full)
                    added.append(value["path"])
                elif line["key"] != "header":
                    raise ValueError(f"fake hub: commit line {line['key']!r} is not served here")
            self.commits.append((header["summary"], added))
            return True

    def entry(self, repo: str, rel: str) -> dict | None:
        full = os.path.join(self.repos[repo], rel)
        if os.path.isdir(full):
            return {"type": "directory", "oid": hashlib.sha1(rel.encode()).hexdigest(), "size": 0, "path": rel}
        if os.path.isfile(full):
            with open(full, "rb") as f:
                oid = hashlib.sha1(f.read()).hexdigest()
            entry = {"type": "file", "oid": oid, "size": os.path.getsize(full), "path": rel}
            if rel.endswith(".parquet"):  # the Hub's .gitattributes tracks *.parquet: it lists them as LFS files
                with open(full, "rb") as f:
                    entry["lfs"] = {"oid": hashlib.sha256(f.read()).hexdigest(), "size": entry["size"], "pointerSize": 134}
            return entry
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
    write = re.compile(r"^/api/datasets/(?P<repo>[^/]+/[^/]+)/(?P<op>preupload|commit)/(?P<rev>[^/]+)$")

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
            if method == "POST" and path == "/api/repos/create":
                return self._create_repo()
            if method == "POST" and path == "/api/validate-yaml":
                return self._validate_yaml()
            if method == "POST" and write.match(path):
                return self._write(write.match(path))
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

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("content-length") or 0))

        def _create_repo(self):
            spec = json.loads(self._body())
            repo = f"{spec.get('organization') or 'me'}/{spec['name']}"
            if repo not in hub.repos:
                if hub.new_repos_root is None:
                    return self._missing("This fake hub creates no repos (no new_repos_root)", "Forbidden")
                hub.repos[repo] = os.path.join(hub.new_repos_root, repo.replace("/", "--"))
                os.makedirs(hub.repos[repo], exist_ok=True)
            return self._json({"url": f"{hub.endpoint}/datasets/{repo}", "name": repo})

        def _validate_yaml(self):
            """What of the Hub's README check is known without the Hub: the front matter parses as a YAML
            mapping, size_categories are the Hub's bins, each config names its data files."""
            import yaml

            content = json.loads(self._body())["content"]
            hub.validated.append(content)
            errors = []
            head = content.split("---\n")[1] if content.startswith("---\n") else ""
            try:
                meta = yaml.safe_load(head) or {}
            except yaml.YAMLError as e:
                meta, errors = {}, [f"YAML: {e}"]
            if not isinstance(meta, dict):
                meta, errors = {}, ["the front matter is not a mapping"]
            errors += [f"size_categories: {c!r}" for c in meta.get("size_categories", []) if c not in SIZE_CATEGORIES]
            errors += [f"configs: {c!r}" for c in meta.get("configs", [])
                       if not (isinstance(c, dict) and c.get("config_name") and c.get("data_files"))]
            return self._json({"errors": [{"message": e} for e in errors], "warnings": []}, 400 if errors else 200)

        def _write(self, m):
            if m["repo"] not in hub.repos:
                return self._missing("Repository not found", "RepoNotFound")
            if m["rev"] not in hub.revisions:
                return self._missing("Invalid rev id", "RevisionNotFound")
            body = self._body()
            if m["op"] == "preupload":
                files = json.loads(body)["files"]
                return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                              "oid": hub.git_oid(m["repo"], f["path"])} for f in files]})
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            if not hub.commit(m["repo"], lines):
                self.send_response(400)
                self.send_header("X-Error-Message", "commit refused by the test")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            return self._json({"commitUrl": f"{hub.endpoint}/datasets/{m['repo']}/commit/{SHA}", "commitOid": SHA,
                               "pullRequestUrl": None})

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
def fake_hub(repos: dict[str, str], *, revisions: set[str] = frozenset(), new_repos_root: str | None = None):
    """Serve `repos` ({"owner/name": local folder}) as dataset repos on 127.0.0.1; yields the hub
    (`endpoint`, `requests`, `commits`, `repos`). `create_repo` makes new ones under `new_repos_root`."""
    hub = _Hub(dict(repos), set(revisions))
    hub.new_repos_root = new_repos_root
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
