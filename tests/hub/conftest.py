"""Fixtures for hub tests: a fake hub on 127.0.0.1 and a runner for the hub CLI in a subprocess.

Downloads run in a child process (`python -m hpcinfer.hub.cli`) because huggingface_hub reads
HF_ENDPOINT / HF_HUB_OFFLINE once at import, and tests/conftest.py sets HF_HUB_OFFLINE=1 for
this process. The child gets a clean environment: its own HF_HOME (so no real login token is
ever used), the fake endpoint, and no proxy.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpcinfer.testing.fake_hub import FakeHub, FakeRepo, commit_sha, tiny_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class HubEnv:
    hub: FakeHub
    env: dict[str, str]
    cache: Path
    home: Path

    def run(self, *args: str, extra_env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hpcinfer.hub.cli", *args],
                              env={**self.env, **(extra_env or {})}, capture_output=True,
                              text=True, timeout=timeout, cwd=REPO_ROOT)

    def run_python(self, code: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True,
                              text=True, timeout=timeout, cwd=REPO_ROOT)

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "hpcinfer.hub.cli", *args], env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=REPO_ROOT)


@pytest.fixture
def files() -> dict[str, bytes]:
    return tiny_checkpoint()


@pytest.fixture
def hub_env(tmp_path, files):
    main = commit_sha("main")
    hub = FakeHub(repos={"org/tiny": FakeRepo(commits={main: files}, refs={"main": main})})
    endpoint = hub.start()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))
           and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "home"),
               HF_HUB_CACHE=str(tmp_path / "cache"), NO_PROXY="127.0.0.1,localhost",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(REPO_ROOT))
    try:
        yield HubEnv(hub=hub, env=env, cache=tmp_path / "cache", home=tmp_path / "home")
    finally:
        hub.stop()
