"""A Hugging Face Hub stand-in on 127.0.0.1 for download tests (point HF_ENDPOINT at it).

It serves the endpoints huggingface_hub (1.x/2.x) actually calls while downloading:
    GET  /api/models/{org}/{name}[/revision/{rev}]     model info: sha, siblings (with sizes)
    GET  /api/models/{org}/{name}/tree/{rev}            recursive file listing
    HEAD /{org}/{name}/resolve/{rev}/{path}             X-Repo-Commit, ETag, Content-Length
    GET  /{org}/{name}/resolve/{rev}/{path}             body, with Range -> 206 for resumes
Access control mirrors the hub's answers: a private repo without the right token gets 401 with
X-Error-Code RepoNotFound; a gated repo lists its info but its files answer 403 with
X-Error-Code GatedRepo. Faults for tests: `drop_once` (send the first N bytes of a file, then
close the connection, once), `fail_paths` (answer 500 for those files until removed) and `slow_paths`
(pause before sending a body, so two concurrent clients really overlap).
Every request is appended to `requests` (method, path, Range header, whether a token came);
the token value itself is never stored.
"""
from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_LFS_SUFFIXES = (".safetensors", ".bin")
_INFO = re.compile(r"^/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?$")
_TREE = re.compile(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


@dataclass
class FakeRepo:
    commits: dict[str, dict[str, bytes]]        # commit sha -> {repo path: content}
    refs: dict[str, str]                        # branch/tag -> commit sha ("main" at least)
    access: str = "public"                      # public | private | gated
    token: str | None = None                    # the token that opens private/gated repos


@dataclass
class RequestLog:
    method: str
    path: str
    range: str | None
    has_token: bool
    t: float = 0.0  # time.monotonic() when the request arrived


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    drop_once: dict[str, int] = field(default_factory=dict)  # repo path -> bytes sent before a cut
    fail_paths: set[str] = field(default_factory=set)    # repo paths answering 500
    slow_paths: dict[str, float] = field(default_factory=dict)  # repo path -> seconds before GET body
    requests: list[RequestLog] = field(default_factory=list)
    endpoint: str = ""

    def start(self) -> str:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self.endpoint

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def gets_of(self, repo_path: str, method: str = "GET") -> list[RequestLog]:
        """GET (or HEAD) requests for one file (any repo, any revision)."""
        return [r for r in self.requests if r.method == method and "/resolve/" in r.path
                and unquote(r.path).endswith("/" + repo_path)]


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - keep pytest output clean
        pass

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        path = urlsplit(self.path).path
        self.fake.requests.append(RequestLog(self.command, path, self.headers.get("Range"),
                                             self.headers.get("Authorization") is not None,
                                             time.monotonic()))
        if m := _TREE.match(path):
            return self._tree(m.group(1), unquote(m.group(2)))
        if m := _INFO.match(path):
            return self._info(m.group(1), unquote(m.group(2) or "main"))
        if m := _RESOLVE.match(path):
            return self._file(m.group(1), unquote(m.group(2)), unquote(m.group(3)), head)
        self._error(404, "RepoNotFound", "not a hub endpoint")

    # --- endpoints -------------------------------------------------------------------------
    def _info(self, repo_id: str, rev: str) -> None:
        found = self._lookup(repo_id, rev, is_file=False)
        if found is None:
            return
        repo, commit = found
        files = repo.commits[commit]
        # model info spells the LFS hash "sha256"; the tree listing spells it "oid".
        siblings = [{"rfilename": p, "size": len(b), "blobId": _git_sha(b),
                     **({"lfs": {"sha256": _lfs(b)["oid"], "size": len(b), "pointerSize": 134}}
                        if p.endswith(_LFS_SUFFIXES) else {})}
                    for p, b in sorted(files.items())]
        self._json({"id": repo_id, "modelId": repo_id, "sha": commit,
                    "private": repo.access == "private",
                    "gated": "manual" if repo.access == "gated" else False,
                    "siblings": siblings})

    def _tree(self, repo_id: str, rev: str) -> None:
        found = self._lookup(repo_id, rev, is_file=False)
        if found is None:
            return
        repo, commit = found
        entries = [{"type": "file", "path": p, "size": len(b), "oid": _git_sha(b),
                    **({"lfs": _lfs(b)} if p.endswith(_LFS_SUFFIXES) else {})}
                   for p, b in sorted(repo.commits[commit].items())]
        self._json(entries)

    def _file(self, repo_id: str, rev: str, repo_path: str, head: bool) -> None:
        found = self._lookup(repo_id, rev, is_file=True)
        if found is None:
            return
        repo, commit = found
        body = repo.commits[commit].get(repo_path)
        if body is None:
            return self._error(404, "EntryNotFound", f"{repo_path} not found", commit)
        if not head and repo_path in self.fake.fail_paths:
            return self._error(500, None, "injected server error", commit)
        start = _range_start(self.headers.get("Range"))
        etag = _lfs(body)["oid"] if repo_path.endswith(_LFS_SUFFIXES) else _git_sha(body)
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{etag}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        if head:
            return
        self._pause(repo_path)
        cut_at = self.fake.drop_once.pop(repo_path, None) if not start else None
        if cut_at is not None:
            self.wfile.write(body[:cut_at])
            self.wfile.flush()
            # Cut the connection mid-body, as a flaky link or a killed proxy would.
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        try:
            self.wfile.write(body[start:])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client was killed mid-transfer (the Ctrl-C test): nothing to answer

    def _pause(self, repo_path: str) -> None:
        # Sleep in small steps so a test that clears slow_paths releases waiting handlers.
        deadline = time.monotonic() + self.fake.slow_paths.get(repo_path, 0.0)
        while repo_path in self.fake.slow_paths and time.monotonic() < deadline:
            time.sleep(0.02)

    # --- helpers ---------------------------------------------------------------------------
    def _lookup(self, repo_id: str, rev: str, is_file: bool) -> tuple[FakeRepo, str] | None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        has_access = repo.token is not None and \
            self.headers.get("Authorization") == f"Bearer {repo.token}"
        if repo.access == "private" and not has_access:
            self._error(401, "RepoNotFound", "Invalid username or password.")
            return None
        if repo.access == "gated" and is_file and not has_access:
            self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are "
                                          f"not in the authorized list.")
            return None
        commit = repo.refs.get(rev)
        if commit is None and len(rev) >= 7:  # a full or abbreviated commit sha
            commit = next((c for c in repo.commits if c.startswith(rev)), None)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo, commit

    def _json(self, data: object) -> None:
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _range_start(header: str | None) -> int:
    if not header:
        return 0
    m = re.match(r"bytes=(\d+)-$", header.strip())
    if m is None:
        raise ValueError(f"fake hub only serves open-ended ranges, got {header!r}")
    return int(m.group(1))


def _git_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _lfs(content: bytes) -> dict:
    return {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}


def commit_sha(label: str) -> str:
    """A stable 40-hex commit id for a test label."""
    return hashlib.sha1(label.encode()).hexdigest()


def tiny_checkpoint(hidden: int = 8, num_layers: int = 2, version: str = "v2") -> dict[str, bytes]:
    """Files of a tiny, valid two-shard llama-style repo, plus a duplicate pytorch_model.bin.

    Shards are real safetensors (written with the `safetensors` package); the .bin duplicate,
    README and .gitattributes exist so tests can check they are not downloaded.
    """
    import numpy as np
    from safetensors.numpy import save

    rng = np.random.default_rng(0)
    tensors = {f"model.layers.{i}.mlp.weight": rng.standard_normal((hidden, hidden), dtype=np.float32)
               for i in range(num_layers)}
    names = sorted(tensors)
    half = len(names) // 2 or 1
    shard_names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    shards = [save({n: tensors[n] for n in names[:half]}), save({n: tensors[n] for n in names[half:]})]
    weight_map = {n: shard_names[0] if i < half else shard_names[1] for i, n in enumerate(names)}
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": weight_map}
    config = {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": num_layers,
              "hpcinfer_test_version": version}
    return {
        "config.json": json.dumps(config).encode(),
        "generation_config.json": b'{"do_sample": false}',
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE"}}).encode(),
        "tokenizer_config.json": b'{"model_max_length": 64}',
        "model.safetensors.index.json": json.dumps(index).encode(),
        shard_names[0]: shards[0],
        shard_names[1]: shards[1],
        "pytorch_model.bin": b"\x80\x02not-a-real-pickle" * 64,
        "README.md": b"# tiny test model\n",
        ".gitattributes": b"*.safetensors filter=lfs\n",
    }
