"""load_format="dummy" (vLLM's name): the model is built from config.json alone with seeded
random weights, quantized layers in their own checkpoint layout (packed 4-bit codes, e4m3
codes with scales), no safetensors read."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from hpcinfer.layers.linear import LinearBase
from hpcinfer.testing.quant import FORMATS

MAX_NEW = 8


def _config_only(base_dir, out_dir, quantization_config: dict | None = None):
    """config.json and the tokenizer of ``base_dir``, no weights."""
    out_dir.mkdir(parents=True)
    for path in base_dir.iterdir():
        if "safetensors" not in path.name and path.is_file():
            shutil.copy(path, out_dir / path.name)
    if quantization_config is not None:
        config = json.loads((out_dir / "config.json").read_text())
        config["quantization_config"] = quantization_config
        (out_dir / "config.json").write_text(json.dumps(config))
    return out_dir


def _generate(path, prompts, **kwargs):
    from hpcinfer import LLM, SamplingParams
    llm = LLM(str(path), max_model_len=128, load_format="dummy", **kwargs)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm


def _methods(llm) -> set[str]:
    return {type(m.quant_method).__name__ for m in llm.llm_engine.runner.model.modules()
            if isinstance(m, LinearBase)}


def _weights(llm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in llm.llm_engine.runner.model.named_parameters()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_unquantized_dummy_loads_generates_and_is_deterministic(dtype, base_dir, tmp_path,
                                                                prompts):
    path = _config_only(base_dir, tmp_path / "cfg")
    got, llm = _generate(path, prompts, dtype=dtype)
    assert all(len(t) == MAX_NEW for t in got)
    weights = _weights(llm)
    assert all(torch.isfinite(w.float()).all() for w in weights.values())
    norms = [w for n, w in weights.items() if n.endswith("norm.weight")]
    assert norms and all((w == 1).all() for w in norms)
    again, llm2 = _generate(path, prompts, dtype=dtype)
    assert again == got
    assert all(torch.equal(w, weights[n]) for n, w in _weights(llm2).items())
    _, other = _generate(path, prompts, dtype=dtype, seed=1)   # the seed picks the weights
    assert not torch.equal(_weights(other)["model.embed_tokens.weight"],
                           weights["model.embed_tokens.weight"])
    # Several distinct tokens: the random model is not stuck on one logit.
    assert len({t for row in got for t in row}) > 3


def test_without_dummy_the_missing_weights_are_an_error(base_dir, tmp_path):
    from hpcinfer import LLM
    path = _config_only(base_dir, tmp_path / "cfg")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(str(path), max_model_len=128)


def test_other_load_formats_are_refused():
    from hpcinfer.engine.config import EngineConfig
    EngineConfig.from_kwargs("m", load_format="safetensors")
    with pytest.raises(ValueError, match="load_format='pt'.*dummy"):
        EngineConfig.from_kwargs("m", load_format="pt")


@pytest.mark.parametrize("fmt, method", [
    ("awq", "Int4Method"), ("gptq_sym", "Int4Method"), ("gptq_asym_desc_act", "Int4Method"),
    ("ct_w4a16_asym", "Int4Method"), ("fp8_block", "Fp8Method"),
    ("ct_fp8_tensor_static", "Fp8Method")])
def test_quantized_dummy(fmt, method, base_dir, tmp_path, prompts):
    path = _config_only(base_dir, tmp_path / fmt, FORMATS[fmt][0])
    got, llm = _generate(path, prompts)
    assert _methods(llm) == {method}
    again, _ = _generate(path, prompts)
    assert again == got and all(len(t) == MAX_NEW for t in got)


@pytest.mark.parametrize("fmt", ["awq", "gptq_sym", "gptq_asym_desc_act", "ct_w4a16",
                                 "ct_w4a16_asym", "fp8_block", "fbgemm_fp8",
                                 "ct_fp8_tensor_static"])
def test_quantized_dummy_weights_dequantize_within_range(fmt, base_dir, tmp_path):
    """Before process_after_loading: the method's own layout, dequantized by its reference,
    spans +-1/sqrt(fan_in) (codes over their whole range, zero points in the middle)."""
    from hpcinfer.layers.quant.base import dummy_range
    from hpcinfer.models import registry
    path = _config_only(base_dir, tmp_path / fmt, FORMATS[fmt][0])
    finished = []
    real_finish = registry.finish_quantization
    registry.finish_quantization = lambda model: finished.append(model)
    try:
        model = registry.load_model(path, dtype=torch.float32, device="cpu",
                                    load_format="dummy")
    finally:
        registry.finish_quantization = real_finish
    layers = [m for m in finished[0].modules()
              if isinstance(m, LinearBase) and type(m.quant_method).__name__ != "UnquantizedMethod"]
    assert len(layers) == 4 * model.spec.num_layers   # qkv, o, gate_up, down
    for layer in layers:
        w = layer.quant_method.dequantized(layer)
        r = dummy_range(layer)
        assert w.abs().max() <= r * 1.0001 and w.abs().max() > 0.5 * r
        assert abs(w.mean()) < 0.1 * r and w.std() > 0.2 * r


def test_job_file_load_format_dummy_runs_a_job(base_dir, tmp_path):
    """engine.load_format: dummy in a job file: the job compiles on a model directory without
    weights (login side), and the worker generates every row from random weights."""
    from hpcinfer.testing.worker_jobs import (job_config, make_job, prompt_rows, read_results,
                                              run_worker, write_jsonl)
    model = _config_only(base_dir, tmp_path / "cfg")
    write_jsonl(tmp_path / "data" / "a.jsonl", prompt_rows(3))
    job_dir = make_job(tmp_path, job_config(model, "data/a.jsonl",
                                            engine={"load_format": "dummy"}))
    code, out = run_worker(job_dir, timeout_s=300)
    assert code == 0, out[-3000:]
    records = [r for rows in read_results(job_dir).values() for r in rows]
    assert len(records) == 3 and all(r.get("num_output_tokens", 1) > 0 for r in records)
    assert "load_format=dummy" in out      # the loader's line: weights were drawn, not read
