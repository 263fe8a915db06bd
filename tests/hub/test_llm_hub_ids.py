"""LLM(model="org/name") as in vLLM's scripts: a hub id is found in the cache (the record of
`hpcinfer download`, or a Hugging Face cache another tool filled), downloaded on first use
where the network is allowed, and refused with what to do where it is not (compute nodes)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

from hpcinfer.testing.fake_hub import FakeRepo, commit_sha
from hpcinfer.testing.tiny import build_tiny_checkpoint

GREEDY = ("from hpcinfer import LLM, SamplingParams; import json; "
          "out = LLM({model!r}, device='cpu', max_model_len=64{extra}).generate("
          "[[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False); "
          "print(json.dumps(out[0].outputs[0].token_ids))")


def _greedy(hub_env, model: str, extra: str = "", **env):
    """A fresh process (huggingface_hub reads HF_HUB_OFFLINE once, at import)."""
    return subprocess.run([sys.executable, "-c", GREEDY.format(model=model, extra=extra)],
                          env={**hub_env.env, **env}, capture_output=True, text=True,
                          timeout=120)


def _tokens(proc) -> list[int]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_hub_id_downloads_once_then_loads_offline(hub_env, tmp_path):
    local = build_tiny_checkpoint("llama", tmp_path / "ckpt")
    files = {p.name: p.read_bytes() for p in local.iterdir() if p.is_file()}
    main = commit_sha("llama-main")
    hub_env.hub.repos["org/llama"] = FakeRepo(commits={main: files}, refs={"main": main})
    want = _tokens(_greedy(hub_env, str(local)))
    assert _tokens(_greedy(hub_env, "org/llama")) == want            # downloaded, recorded
    assert _tokens(_greedy(hub_env, "org/llama", HF_HUB_OFFLINE="1")) == want   # from the cache
    offline = _greedy(hub_env, "org/other", HF_HUB_OFFLINE="1")
    assert offline.returncode != 0
    assert "run `hpcinfer download org/other` on the login node" in offline.stderr


def test_hub_id_found_in_a_cache_another_tool_filled(hub_env, tmp_path):
    """A snapshot in the Hugging Face cache layout with no hpcinfer record (vLLM or
    transformers fetched it): found offline, at its revision."""
    local = build_tiny_checkpoint("llama", tmp_path / "ckpt")
    commit = commit_sha("elsewhere")
    repo = hub_env.cache / "models--someone--tiny"
    shutil.copytree(local, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    want = _tokens(_greedy(hub_env, str(local)))
    assert _tokens(_greedy(hub_env, "someone/tiny", HF_HUB_OFFLINE="1")) == want
    assert _tokens(_greedy(hub_env, "someone/tiny", extra=", revision='main'",
                           HF_HUB_OFFLINE="1")) == want
    missing = _greedy(hub_env, "someone/tiny", extra=", revision='v2'", HF_HUB_OFFLINE="1")
    assert missing.returncode != 0 and "at revision v2 is not downloaded" in missing.stderr
