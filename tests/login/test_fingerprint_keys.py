"""Which settings make a job dir another config's (compile/fingerprint.py): the engine keys
that change the numbers (quantization, kv_cache_dtype, load_format) and the LoRA adapters
count, and only when set, so job dirs rendered before they counted still resume; engine
sizes and LoRA slot counts do not."""
from __future__ import annotations

import json

import pytest
import yaml

from hpcinfer.compile.fingerprint import compute, diff
from hpcinfer.config import load_job


def _fingerprint(tmp_path, **sections):
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "p.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    config = {"name": "f", "cluster": "generic", "task": "generate",
              "model": {"id": str(tmp_path / "model")},
              "input": {"path": "p.jsonl", "id_field": "id", "prompt_field": "prompt"},
              "output": {"dir": "out"}, "resources": {"device": "cpu"}, **sections}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(config))
    return compute(load_job(job, check_environment=False), [], with_files=False)


@pytest.mark.parametrize("sections, key, value", [
    ({"engine": {"quantization": "fp8"}}, "engine.quantization", "fp8"),
    ({"engine": {"kv_cache_dtype": "fp8"}}, "engine.kv_cache_dtype", "fp8"),
    ({"engine": {"load_format": "dummy"}}, "engine.load_format", "dummy"),
    ({"lora": {"adapters": {"sql": "/adapters/sql"}}}, "lora.adapters", {"sql": "/adapters/sql"}),
])
def test_output_changing_settings_count(tmp_path, sections, key, value):
    plain = _fingerprint(tmp_path)
    changed = _fingerprint(tmp_path, **sections)
    assert key not in plain.values          # the default: as job dirs rendered before
    assert changed.values[key] == value and changed.digest != plain.digest
    assert diff(plain.values, changed.values) == [
        f"{key}: (none) -> {value if isinstance(value, str) else json.dumps(value)}"]


def test_speed_settings_do_not_count(tmp_path):
    plain = _fingerprint(tmp_path)
    faster = _fingerprint(tmp_path, engine={"max_num_seqs": 8, "enforce_eager": True,
                                            "kv_cache_dtype": "auto"},
                          lora={"max_loras": 2, "max_lora_rank": 32})
    assert faster.digest == plain.digest
