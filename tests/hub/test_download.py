"""`hpcinfer download` / `models` / `verify-model` end to end, against the fake hub on 127.0.0.1."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from hpcinfer.hub.errors import EXIT_CODE
from hpcinfer.hub.offline import resolve_model
from hpcinfer.hub.record import find_record
from hpcinfer.testing.fake_hub import FakeRepo, commit_sha, tiny_checkpoint

MODEL = "org/tiny"
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
WANTED = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "model.safetensors.index.json", SHARD1, SHARD2}


def _snapshot(hub_env, commit: str) -> Path:
    return hub_env.cache / "models--org--tiny" / "snapshots" / commit


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()}


def _assert_one_line_error(proc, *needles: str) -> None:
    assert proc.returncode == EXIT_CODE, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_full_download_records_pins_and_lists(hub_env, files):
    proc = hub_env.run("download", MODEL)
    assert proc.returncode == 0, proc.stderr
    commit = commit_sha("main")
    snap = _snapshot(hub_env, commit)
    # One copy of the weights: safetensors shards, no pytorch_model.bin, no README/.gitattributes.
    assert _tree(snap) == WANTED
    for name in WANTED:
        assert (snap / name).read_bytes() == files[name]
    assert not hub_env.hub.gets_of("pytorch_model.bin")
    assert str(snap) in proc.stdout and commit in proc.stdout

    record = find_record(MODEL, cache_dir=hub_env.cache)
    assert (record.id, record.revision, record.commit) == (MODEL, "main", commit)
    assert Path(record.path).is_absolute() and Path(record.path) == snap.resolve()
    assert record.files == {n: len(files[n]) for n in WANTED}
    assert record.size == sum(len(files[n]) for n in WANTED)
    assert (hub_env.cache / "models--org--tiny" / "refs" / "main").read_text() == commit

    listed = hub_env.run("models")
    assert listed.returncode == 0 and MODEL in listed.stdout and commit[:12] in listed.stdout
    as_json = json.loads(hub_env.run("models", "--json").stdout)
    assert [(r["id"], r["commit"], r["path"]) for r in as_json] == [(MODEL, commit, record.path)]

    resolved = resolve_model(MODEL, cache_dir=hub_env.cache)
    assert (resolved.path, resolved.commit) == (record.path, commit)
    # Snapshot files link into ../../blobs: a container must bind the whole model folder.
    assert resolved.bind_path == str(snap.resolve().parents[1])
    assert all(os.path.realpath(snap / n).startswith(resolved.bind_path + os.sep) for n in WANTED)

    ok = hub_env.run("verify-model", MODEL)
    assert ok.returncode == 0 and ok.stdout.startswith("ok:"), ok.stderr
    # Damage a shard behind the cache's back: verify-model names it.
    shard = snap / SHARD2
    data = shard.read_bytes()
    Path(os.path.realpath(shard)).write_bytes(data[:-8])
    bad = hub_env.run("verify-model", MODEL)
    _assert_one_line_error(bad, SHARD2, f"{len(data) - 8} bytes", f"the hub says {len(data)}")
    bad_dir = hub_env.run("verify-model", str(snap))  # no record: the header check catches it
    _assert_one_line_error(bad_dir, SHARD2, "truncated")
    # As the message advises, downloading again repairs the damaged file (and only that one).
    repaired = hub_env.run("download", MODEL)
    assert repaired.returncode == 0, repaired.stderr
    assert (snap / SHARD2).read_bytes() == data
    assert len(hub_env.hub.gets_of(SHARD2)) == 2 and len(hub_env.hub.gets_of(SHARD1)) == 1
    assert hub_env.run("verify-model", MODEL).returncode == 0


def test_revision_pins_an_older_commit(hub_env):
    old, new = commit_sha("old"), commit_sha("main")
    repo = hub_env.hub.repos[MODEL]
    repo.commits[old] = tiny_checkpoint(version="v1")
    proc = hub_env.run("download", MODEL, "--revision", old[:10])
    assert proc.returncode == 0, proc.stderr
    snap = _snapshot(hub_env, old)
    assert json.loads((snap / "config.json").read_text())["hpcinfer_test_version"] == "v1"
    assert not _snapshot(hub_env, new).exists()
    assert find_record(MODEL, old[:10], hub_env.cache).commit == old
    assert resolve_model(MODEL, cache_dir=hub_env.cache).commit == old  # the only download

    assert hub_env.run("download", MODEL).returncode == 0
    # No revision asked for -> the download of main; a pinned one stays reachable.
    assert resolve_model(MODEL, cache_dir=hub_env.cache).commit == new
    assert resolve_model(MODEL, old[:8], hub_env.cache).path == str(snap.resolve())
    assert resolve_model(MODEL, old, hub_env.cache).commit == old


def test_unknown_revision_or_bad_id_is_one_clear_error(hub_env):
    proc = hub_env.run("download", MODEL, "--revision", "no-such-branch")
    _assert_one_line_error(proc, "no-such-branch", "--revision")
    proc = hub_env.run("download", "org/has space")
    _assert_one_line_error(proc, "'org/has space' is not a hub model id")


def test_include_and_exclude_patterns(hub_env):
    proc = hub_env.run("download", MODEL, "--include", "README.md", "--exclude", "tokenizer*")
    assert proc.returncode == 0, proc.stderr
    snap = _snapshot(hub_env, commit_sha("main"))
    assert _tree(snap) == (WANTED | {"README.md"}) - {"tokenizer.json", "tokenizer_config.json"}
    record = find_record(MODEL, cache_dir=hub_env.cache)
    assert record.patterns == {"include": ["README.md"], "exclude": ["tokenizer*"]}
    assert hub_env.run("verify-model", MODEL).returncode == 0


def test_connection_dropped_mid_file_is_resumed_with_range(hub_env):
    # huggingface_hub writes in 10 MiB chunks, so only a file past that shows a Range resume:
    # ~11.6 MB shards, cut 1 MB before the end.
    big = tiny_checkpoint(hidden=1700)
    hub_env.hub.repos[MODEL].commits[commit_sha("main")] = big
    hub_env.hub.drop_once[SHARD1] = len(big[SHARD1]) - 1_000_000
    proc = hub_env.run("download", MODEL)
    assert proc.returncode == 0, proc.stderr
    gets = hub_env.hub.gets_of(SHARD1)
    assert len(gets) == 2, gets
    assert gets[0].range is None
    resumed_at = int(gets[1].range.removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at < len(big[SHARD1]) - 1_000_000
    assert (_snapshot(hub_env, commit_sha("main")) / SHARD1).read_bytes() == big[SHARD1]


def test_failed_run_resumes_without_refetching_finished_files(hub_env, files):
    hub_env.hub.fail_paths.add(SHARD2)
    first = hub_env.run("download", MODEL)
    _assert_one_line_error(first, MODEL, "re-run")
    assert find_record(MODEL, cache_dir=hub_env.cache) is None
    hub_env.hub.fail_paths.clear()
    second = hub_env.run("download", MODEL)
    assert second.returncode == 0, second.stderr
    assert len(hub_env.hub.gets_of(SHARD1)) == 1  # kept from the first run
    assert len(hub_env.hub.gets_of(SHARD2)) == 2
    assert (_snapshot(hub_env, commit_sha("main")) / SHARD2).read_bytes() == files[SHARD2]


def test_two_concurrent_downloads_share_one_copy(hub_env, files):
    # Slow bodies make both processes ask for the shards while the other is still fetching them.
    slow_s = 1.0  # generous: both processes start together, but CI machines are busy
    hub_env.hub.slow_paths.update({SHARD1: slow_s, SHARD2: slow_s})
    procs = [hub_env.popen("download", MODEL) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    # They really overlapped: the second asked for shard 1 while the first was receiving it.
    heads = hub_env.hub.gets_of(SHARD1, "HEAD")
    first_get = hub_env.hub.gets_of(SHARD1)[0]
    assert len(heads) == 2 and max(h.t for h in heads) < first_get.t + slow_s, heads
    snap = _snapshot(hub_env, commit_sha("main"))
    assert _tree(snap) == WANTED
    for name in WANTED:
        assert (snap / name).read_bytes() == files[name]
    blobs = hub_env.cache / "models--org--tiny" / "blobs"
    # One blob per file (no duplicate copy, no leftover partial download).
    assert sorted(p.name for p in blobs.iterdir() if not p.name.endswith(".incomplete")) == \
        sorted({os.path.basename(os.path.realpath(snap / n)) for n in WANTED})
    assert not list(hub_env.cache.rglob("*.incomplete"))
    record = find_record(MODEL, cache_dir=hub_env.cache)
    assert record.commit == commit_sha("main")


def test_private_model_401_then_token_from_env(hub_env):
    secret = "hf_secret_test_value"
    commit = commit_sha("private")
    hub_env.hub.repos["org/private"] = FakeRepo(commits={commit: tiny_checkpoint()},
                                                refs={"main": commit}, access="private",
                                                token=secret)
    denied = hub_env.run("download", "org/private")
    _assert_one_line_error(denied, "org/private", "HTTP 401", "https://huggingface.co/org/private",
                           "hf auth login", "HF_TOKEN")
    assert find_record("org/private", cache_dir=hub_env.cache) is None

    allowed = hub_env.run("download", "org/private", extra_env={"HF_TOKEN": secret})
    assert allowed.returncode == 0, allowed.stderr
    assert all(r.has_token for r in hub_env.hub.requests if "org/private" in r.path
               and r.path.startswith("/org/"))
    # The token never lands in our output or anywhere in the cache (records included).
    assert secret not in allowed.stdout + allowed.stderr + denied.stderr
    for path in hub_env.cache.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_gated_model_403_says_request_access(hub_env):
    commit = commit_sha("gated")
    hub_env.hub.repos["org/gated"] = FakeRepo(commits={commit: tiny_checkpoint()},
                                              refs={"main": commit}, access="gated",
                                              token="hf_has_access")
    proc = hub_env.run("download", "org/gated", extra_env={"HF_TOKEN": "hf_no_access"})
    _assert_one_line_error(proc, "org/gated", "gated", "HTTP 403", "request access",
                           "https://huggingface.co/org/gated", "hf auth login", "HF_TOKEN")
    assert "hf_no_access" not in proc.stdout + proc.stderr
    assert find_record("org/gated", cache_dir=hub_env.cache) is None


def test_missing_shard_fails_verification_naming_it(hub_env):
    del hub_env.hub.repos[MODEL].commits[commit_sha("main")][SHARD2]
    proc = hub_env.run("download", MODEL)
    _assert_one_line_error(proc, SHARD2, "missing")
    assert find_record(MODEL, cache_dir=hub_env.cache) is None


def test_download_refuses_offline_mode(hub_env):
    proc = hub_env.run("download", MODEL, extra_env={"HF_HUB_OFFLINE": "1"})
    _assert_one_line_error(proc, "HF_HUB_OFFLINE", "login node")
    assert not hub_env.hub.requests


def test_cache_dir_flag_keeps_records_with_that_cache(hub_env, tmp_path):
    other = tmp_path / "lustre-cache"
    proc = hub_env.run("download", MODEL, "--cache-dir", str(other))
    assert proc.returncode == 0, proc.stderr
    assert find_record(MODEL, cache_dir=hub_env.cache) is None
    assert find_record(MODEL, cache_dir=other).path.startswith(str(other.resolve()))
    listed = hub_env.run("models", "--cache-dir", str(other))
    assert MODEL in listed.stdout


def test_ctrl_c_exits_at_once_and_the_next_run_resumes(hub_env, files):
    hub_env.hub.slow_paths[SHARD2] = 20.0  # still "downloading" when Ctrl-C arrives
    proc = hub_env.popen("download", MODEL)
    deadline = time.monotonic() + 30
    while not hub_env.hub.gets_of(SHARD2) or not (_snapshot(hub_env, commit_sha("main")) / SHARD1).exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 130 and time.monotonic() - sent < 5, err
    assert f"run `hpcinfer download {MODEL}` again to resume" in err
    assert find_record(MODEL, cache_dir=hub_env.cache) is None

    blobs = hub_env.cache / "models--org--tiny" / "blobs"
    partials = list(blobs.glob("*.incomplete"))
    assert partials  # the killed transfer's temp file ...
    hour_ago = time.time() - 2 * 3600
    for p in partials:
        os.utime(p, (hour_ago, hour_ago))
    hub_env.hub.slow_paths.clear()
    again = hub_env.run("download", MODEL)
    assert again.returncode == 0, again.stderr
    assert not list(blobs.glob("*.incomplete"))  # ... is cleaned up by the next download
    assert len(hub_env.hub.gets_of(SHARD1)) == 1  # finished before Ctrl-C: not fetched again
    assert (_snapshot(hub_env, commit_sha("main")) / SHARD2).read_bytes() == files[SHARD2]


def test_resolve_or_download_downloads_once(hub_env):
    code = ("from hpcinfer.hub import resolve_or_download\n"
            "r = resolve_or_download('org/tiny')\n"
            "print(r.commit, r.path)\n")
    first = hub_env.run_python(code)
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == [commit_sha("main"), str(_snapshot(hub_env, commit_sha("main")).resolve())]
    num_requests = len(hub_env.hub.requests)
    second = hub_env.run_python(code)
    assert second.stdout == first.stdout
    assert len(hub_env.hub.requests) == num_requests  # already recorded: no network at all
