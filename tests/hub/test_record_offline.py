"""Download records and the compute-node side: set_offline_env and resolve_model, no network."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from hpcinfer.hub.errors import ModelNotDownloaded, ModelPathNotFound
from hpcinfer.hub.offline import resolve_model, set_offline_env
from hpcinfer.hub.record import ModelRecord, find_record, read_records, record_path, write_record

REPO_ROOT = Path(__file__).resolve().parents[2]
OLD, NEW = "a" * 40, "b" * 40


def _record(tmp_path: Path, model_id="org/m", revision="main", commit=NEW, at="2026-01-02") -> ModelRecord:
    snap = tmp_path / "cache" / f"models--{model_id.replace('/', '--')}" / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (snap / "config.json").write_text("{}")
    return ModelRecord(id=model_id, revision=revision, commit=commit, path=str(snap),
                       files={"config.json": 2}, size=2, downloaded_at=at)


def test_record_round_trip_and_lookup(tmp_path):
    cache = tmp_path / "cache"
    main = _record(tmp_path, at="2026-01-01")
    pinned = _record(tmp_path, revision="v1.0", commit=OLD, at="2026-01-05")
    branch = _record(tmp_path, revision="refs/pr/1", commit=OLD, at="2026-01-03")
    for r in (main, pinned, branch):
        write_record(r, cache)
    assert record_path("org/m", "refs/pr/1", cache).name == "refs%2Fpr%2F1.json"
    assert find_record("org/m", "main", cache) == main
    assert find_record("org/m", "refs/pr/1", cache) == branch
    assert find_record("org/m", None, cache) == main        # no revision -> main's download
    assert find_record("org/m", OLD[:7], cache).commit == OLD  # commit prefix
    assert find_record("org/m", "v2", cache) is None
    assert find_record("org/other", None, cache) is None
    assert [r.revision for r in read_records(cache_dir=cache)] == ["v1.0", "refs/pr/1", "main"]
    only_pinned = tmp_path / "c2"
    write_record(pinned, only_pinned)
    assert find_record("org/m", None, only_pinned) == pinned  # no main -> newest


def test_unreadable_record_is_skipped_with_a_warning(tmp_path, caplog):
    cache = tmp_path / "cache"
    good = _record(tmp_path)
    write_record(good, cache)
    bad = record_path("org/m", "broken", cache)
    bad.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert read_records("org/m", cache) == [good]
    assert str(bad) in caplog.text


def test_concurrent_writers_never_expose_a_partial_record(tmp_path):
    cache = tmp_path / "cache"
    base = _record(tmp_path)
    write_record(base, cache)
    stop = threading.Event()
    seen: list[str] = []

    def writer(n: int) -> None:
        while not stop.is_set():
            write_record(replace(base, downloaded_at=f"2026-01-0{n}", files={"config.json": 2,
                                 **{f"f{i}": i for i in range(200)}}), cache)

    threads = [threading.Thread(target=writer, args=(n,)) for n in (1, 2, 3)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            data = json.loads(record_path("org/m", "main", cache).read_text())  # never half a file
            seen.append(data["downloaded_at"])
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(seen) > 10
    leftovers = [p.name for p in record_path("org/m", "main", cache).parent.iterdir()]
    assert leftovers == ["main.json"]


def test_resolve_model_from_record_local_dir_and_errors(tmp_path):
    cache = tmp_path / "cache"
    rec = _record(tmp_path)
    write_record(rec, cache)
    resolved = resolve_model("org/m", None, cache)
    assert (resolved.path, resolved.commit, resolved.revision) == (rec.path, NEW, "main")
    # A local directory resolves to itself; inside an HF cache it even knows its commit.
    local = resolve_model(rec.path)
    assert (local.path, local.commit) == (rec.path, NEW)
    plain = tmp_path / "my-model"
    plain.mkdir()
    assert resolve_model(str(plain)).path == str(plain) and resolve_model(str(plain)).commit is None

    with pytest.raises(ModelNotDownloaded) as info:
        resolve_model("org/never", "v3", cache)
    assert "run `hpcinfer download org/never --revision v3` on the login node first" in str(info.value)
    with pytest.raises(ModelPathNotFound) as info:
        resolve_model(str(tmp_path / "no" / "such" / "dir"))
    assert "is not a directory" in str(info.value)
    # The record survives but the cache was purged: same advice, naming the missing file.
    (Path(rec.path) / "config.json").unlink()
    with pytest.raises(ModelNotDownloaded) as info:
        resolve_model("org/m", None, cache)
    assert "config.json is gone" in str(info.value) and "hpcinfer download org/m" in str(info.value)


def test_set_offline_env_keeps_cache_variables():
    env = {"HF_HOME": "/lustre/hf", "HF_HUB_CACHE": "/lustre/hf/hub", "HF_HUB_OFFLINE": "0"}
    set_offline_env(env)
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == "1"
    assert (env["HF_HOME"], env["HF_HUB_CACHE"]) == ("/lustre/hf", "/lustre/hf/hub")


_WORKER = """
import os, sys, time
start = time.monotonic()
from hpcinfer.hub.offline import resolve_model, set_offline_env
from hpcinfer.hub.errors import ModelNotDownloaded
set_offline_env(os.environ)
try:
    resolve_model("org/never-downloaded")
except ModelNotDownloaded as exc:
    print("ERROR", exc)
assert "huggingface_hub" not in sys.modules, "resolve_model must not need the hub client"
import huggingface_hub
from huggingface_hub import hf_hub_download
try:
    hf_hub_download("org/never-downloaded", "config.json")
except Exception as exc:
    print("HUB", type(exc).__name__)
print("ELAPSED", time.monotonic() - start)
"""


def test_worker_without_network_fails_fast_with_advice(tmp_path):
    # 10.255.255.1 is unroutable: any connection attempt would hang, so a fast answer proves
    # that nothing tried the network.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://10.255.255.1",
               PYTHONPATH=str(REPO_ROOT))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _WORKER], env=env, capture_output=True, text=True,
                          timeout=30)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert "run `hpcinfer download org/never-downloaded` on the login node first" in proc.stdout
    assert "HUB LocalEntryNotFoundError" in proc.stdout or "HUB OfflineModeIsEnabled" in proc.stdout
    assert elapsed < 5, f"took {elapsed:.1f} s"


def test_login_side_modules_import_nothing_heavy():
    code = ("import sys, argparse\n"
            "import hpcinfer.hub.cli, hpcinfer.hub.download, hpcinfer.hub.offline, hpcinfer.hub.verify\n"
            "from hpcinfer.hub.cli import add_hub_commands\n"
            "add_hub_commands(argparse.ArgumentParser().add_subparsers())\n"
            "heavy = {'torch', 'transformers', 'triton', 'huggingface_hub', 'safetensors', 'numpy'}\n"
            "print(sorted(heavy & set(sys.modules)))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
