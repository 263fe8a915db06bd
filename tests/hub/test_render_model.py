"""render/submit/run pin a hub model id to its downloaded snapshot (hpcinfer/compile/model.py).

A download is simulated by what `hpcinfer download` leaves behind: a snapshot of symlinks into
blobs/ in an HF cache and a record (hub/record.py). The `--download` case runs the real CLI in a
child process against the fake hub on 127.0.0.1 (tests/hub/conftest.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hpcinfer.cli import main
from hpcinfer.config import load_resolved
from hpcinfer.hub.record import ModelRecord, utc_now, write_record
from hpcinfer.testing.fake_hub import commit_sha
from hpcinfer.testing.jobs import tree, write_job
from hpcinfer.testing.tools import shellcheck_bin

SHA = commit_sha("main")


def fake_download(cache: Path, model_id: str = "org/tiny", revision: str = "main",
                  commit: str = SHA) -> Path:
    """The snapshot + record `hpcinfer download` would write; returns the snapshot dir."""
    repo = cache / ("models--" + model_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"x" * 16}
    for name, data in files.items():
        blob = repo / "blobs" / f"{commit[:8]}-{name}"
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    write_record(ModelRecord(id=model_id, revision=revision, commit=commit, path=str(snapshot),
                             files={k: len(v) for k, v in files.items()},
                             size=sum(map(len, files.values())), downloaded_at=utc_now()), cache)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def resolved_model(job_dir: Path) -> dict:
    return yaml.safe_load((job_dir / "job.yaml").read_text())["model"]


def test_render_writes_the_snapshot_path_commit_and_source_id(tmp_path, cache, capsys):
    snapshot = fake_download(cache)
    job = write_job(tmp_path / "w", model={"id": "org/tiny"})
    assert main(["render", str(job)]) == 0, capsys.readouterr().err
    model = resolved_model(tmp_path / "w" / "out")
    assert model["id"] == str(snapshot) and os.path.isabs(model["id"])
    assert (model["revision"], model["source_id"]) == (SHA, "org/tiny")
    # The worker's view: a local directory, nothing left to look up on the hub.
    cfg = load_resolved(tmp_path / "w" / "out")
    assert Path(cfg.model.id, "config.json").is_file() and cfg.model.source_id == "org/tiny"


def test_revision_pins_to_the_recorded_commit(tmp_path, cache, capsys):
    v1 = commit_sha("v1")
    fake_download(cache, revision="v1", commit=v1)
    for revision in ("v1", v1[:10]):  # the name, or an abbreviated commit
        job = write_job(tmp_path / revision, model={"id": "org/tiny", "revision": revision})
        assert main(["render", str(job)]) == 0, capsys.readouterr().err
        assert resolved_model(tmp_path / revision / "out")["revision"] == v1
    job = write_job(tmp_path / "other", model={"id": "org/tiny", "revision": "v2"})
    assert main(["render", str(job)]) == 2
    assert "run `hpcinfer download org/tiny --revision v2` on the login node first" in \
        capsys.readouterr().err


@pytest.mark.parametrize("command", ["render", "validate", "submit", "run"])
def test_a_model_that_is_not_downloaded_stops_with_the_advice(tmp_path, cache, capsys, command,
                                                              monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin") + os.pathsep + os.environ["PATH"])
    (tmp_path / "no-bin").mkdir()
    (tmp_path / "no-bin" / "sbatch").write_text("#!/bin/sh\nexit 99\n")  # never reached
    (tmp_path / "no-bin" / "sbatch").chmod(0o755)
    job = write_job(tmp_path / "w", model={"id": "org/absent"})
    before = tree(tmp_path / "w")
    args = [command, str(job)] + (["--local"] if command == "run" else [])
    started = time.monotonic()
    assert main(args) == 2
    assert time.monotonic() - started < 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"hpcinfer: error: {job}:") and "model.id" in err[0]
    assert "run `hpcinfer download org/absent` on the login node first" in err[0]
    if command != "validate":
        assert "--download" in err[0]
    assert tree(tmp_path / "w") == before            # nothing rendered


def test_a_snapshot_deleted_from_the_cache_is_not_downloaded(tmp_path, cache, capsys):
    snapshot = fake_download(cache)
    (snapshot / "model.safetensors").unlink()
    job = write_job(tmp_path / "w", model={"id": "org/tiny"})
    assert main(["render", str(job)]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors is gone from the cache" in err and "hpcinfer download org/tiny" in err


def test_local_paths_stay_as_written(tmp_path, cache, capsys):
    job = write_job(tmp_path / "w")        # model.id: ./model
    assert main(["render", str(job)]) == 0, capsys.readouterr().err
    model = resolved_model(tmp_path / "w" / "out")
    assert model["id"] == str(tmp_path / "w" / "model")
    assert model["revision"] is None and model["source_id"] is None


def test_hub_tokenizer_is_pinned_too(tmp_path, cache, capsys):
    snapshot = fake_download(cache, "org/tok")
    job = write_job(tmp_path / "w", model={"id": "./model", "tokenizer": "org/tok"})
    assert main(["render", str(job)]) == 0, capsys.readouterr().err
    assert resolved_model(tmp_path / "w" / "out")["tokenizer"] == str(snapshot)


def test_container_job_binds_the_cache_inputs_and_job_dir(tmp_path, monkeypatch, capsys):
    """A shared hub cache outside HF_HOME (Lustre): both are bound, the model through the cache
    that holds its models--org--name folder."""
    hf_home, cache = tmp_path / "home-hf", tmp_path / "lustre" / "hub"
    hf_home.mkdir()
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    fake_download(cache)
    image = tmp_path / "img.sif"
    image.write_text("")
    job = write_job(tmp_path / "w", model={"id": "org/tiny"}, cluster="aau-ai-cloud",
                    container={"image": str(image)}, resources={"device": "cuda"})
    assert main(["render", str(job)]) == 0, capsys.readouterr().err
    from hpcinfer.compile.jobdir import load_plan
    binds = set(load_plan(tmp_path / "w" / "out").container.binds)
    assert binds == {str(tmp_path / "w" / "out"), str(tmp_path / "w" / "data"), str(hf_home),
                     str(cache), "/dev/shm"}
    script = tmp_path / "w" / "out" / "submit.sbatch"
    text = script.read_text()
    assert "worker=(singularity exec --nv" in text and f"--bind {cache}" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    lint = subprocess.run([shellcheck_bin(), str(script)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


def test_model_binds_use_the_repo_folder_and_skip_nested_paths(tmp_path):
    from hpcinfer.compile.container import model_binds
    snapshot = fake_download(tmp_path / "cache")
    repo = str(snapshot.parent.parent)
    assert model_binds([str(snapshot)], None, str(tmp_path / "missing")) == [repo]
    assert model_binds([str(snapshot)], None, str(tmp_path / "cache")) == [str(tmp_path / "cache")]
    plain = tmp_path / "ckpt"
    plain.mkdir()
    assert model_binds([str(plain)], str(tmp_path / "nope"), str(tmp_path / "nope")) == [str(plain)]


def test_render_download_fetches_a_missing_model_first(tmp_path, hub_env):
    job = write_job(tmp_path / "w", model={"id": "org/tiny"})
    cli = [sys.executable, "-m", "hpcinfer.cli", "render", str(job)]
    refused = subprocess.run(cli, env=hub_env.env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "hpcinfer download org/tiny" in refused.stderr
    assert not hub_env.hub.requests                  # without --download: no network at all
    done = subprocess.run(cli + ["--download"], env=hub_env.env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    model = resolved_model(tmp_path / "w" / "out")
    assert model["id"] == str(hub_env.cache / "models--org--tiny" / "snapshots" / SHA)
    assert model["revision"] == SHA and Path(model["id"], "config.json").is_file()
    # Downloaded now, so a plain render finds it (and still never touches the network).
    num_requests = len(hub_env.hub.requests)
    again = subprocess.run(cli, env=hub_env.env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and len(hub_env.hub.requests) == num_requests


def test_render_download_of_a_gated_model_says_how_to_get_access(tmp_path, hub_env):
    from hpcinfer.testing.fake_hub import FakeRepo
    hub_env.hub.repos["org/gated"] = FakeRepo(commits={SHA: {"config.json": b"{}"}},
                                              refs={"main": SHA}, access="gated", token="hf_ok")
    job = write_job(tmp_path / "w", model={"id": "org/gated"})
    proc = subprocess.run([sys.executable, "-m", "hpcinfer.cli", "render", str(job), "--download"],
                          env=hub_env.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "the model is gated" in proc.stderr and "https://huggingface.co/org/gated" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]      # (above it: the download's progress bar)
    assert last.startswith("hpcinfer: error: ") and "model.id" in last and "gated" in last


def test_worker_with_no_network_and_a_model_not_downloaded_fails_fast_with_the_advice(tmp_path):
    """The compute side of the same refusal: the real worker, an unroutable hub endpoint (any
    connection attempt would hang), a job.yaml naming a hub id that was never downloaded."""
    from hpcinfer.compile.jobdir import compile_job, write_job_dir
    from hpcinfer.config import load_job
    job = write_job(tmp_path / "w", rows=(2,))
    job_dir = write_job_dir(compile_job(load_job(job)))
    job_yaml = job_dir / "job.yaml"
    job_yaml.write_text(job_yaml.read_text().replace(str(tmp_path / "w" / "model"),
                                                     "acme/never-downloaded"))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))
           and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://10.255.255.1",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "hpcinfer.worker", str(job_dir)], env=env,
                          capture_output=True, text=True, timeout=30)
    elapsed_s = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr
    assert elapsed_s < 5, f"took {elapsed_s:.1f} s"
    assert ("run `hpcinfer download acme/never-downloaded` on the login node first"
            in proc.stderr), proc.stderr
