"""LLM.start_profile()/stop_profile() (vLLM's names, engine/profiling.py): a Chrome trace of
what ran between them, in the directory VLLM_TORCH_PROFILER_DIR names."""
from __future__ import annotations

import json

import pytest

from hpcinfer import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint("llama"), max_model_len=128, max_num_seqs=4)


def test_trace_of_a_generate_call(llm, tmp_path, monkeypatch):
    monkeypatch.delenv("HPCINFER_TORCH_PROFILER_DIR", raising=False)
    monkeypatch.setenv("VLLM_TORCH_PROFILER_DIR", str(tmp_path / "profile"))
    llm.start_profile()
    llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=3),
                 use_tqdm=False)
    llm.stop_profile()
    traces = list((tmp_path / "profile").glob("*.pt.trace.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert any(n and n.startswith("aten::") for n in names)   # the forward's ops are in it
    # a second trace goes to a second file
    llm.start_profile()
    llm.stop_profile()
    assert len(list((tmp_path / "profile").glob("*.pt.trace.json"))) == 2


def test_misuse_says_what_to_do(llm, monkeypatch, tmp_path):
    for name in ("HPCINFER_TORCH_PROFILER_DIR", "VLLM_TORCH_PROFILER_DIR"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="set HPCINFER_TORCH_PROFILER_DIR or "
                                           "VLLM_TORCH_PROFILER_DIR"):
        llm.start_profile()
    with pytest.raises(RuntimeError, match="without a start_profile"):
        llm.stop_profile()
    monkeypatch.setenv("HPCINFER_TORCH_PROFILER_DIR", str(tmp_path))
    llm.start_profile()
    with pytest.raises(RuntimeError, match="called again before stop_profile"):
        llm.start_profile()
    llm.stop_profile()
    assert list(tmp_path.glob("*.pt.trace.json"))
