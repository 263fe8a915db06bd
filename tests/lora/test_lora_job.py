"""LoRA through the real worker: a job's lora.adapters, a per-row adapter column (JSONL) and
OpenAI-batch rows whose body.model names an adapter give the Python API's text for each row;
a row naming an unknown adapter goes to errors.jsonl while the others are answered."""
from __future__ import annotations

import pytest
import yaml

from hpcinfer import LLM, SamplingParams
from hpcinfer.lora.request import LoRARequest
from hpcinfer.testing.tiny_lora import build_tiny_adapter
from hpcinfer.testing.worker_jobs import (job_config, make_job, read_errors, read_results,
                                          run_worker, write_jsonl, write_parquet)

pytestmark = pytest.mark.timeout(300)
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-job")
    from hpcinfer.testing.tiny import build_tiny_checkpoint
    model = build_tiny_checkpoint("llama", root / "model")
    adapters = {"alpha": build_tiny_adapter(model, root / "alpha", rank=8, alpha=24.0),
                "beta": build_tiny_adapter(model, root / "beta", rank=4, alpha=8.0,
                                           targets=("q_proj", "v_proj", "down_proj"), seed=7)}
    return root, model, {k: str(v) for k, v in adapters.items()}


def python_api_texts(model, adapters, rows):
    """What LLM.generate answers for (prompt, adapter name or None) rows (the job's ids)."""
    ids = {name: i + 1 for i, name in enumerate(sorted(adapters))}
    llm = LLM(str(model), device="cpu", enable_lora=True, max_loras=len(adapters),
              max_num_seqs=4, max_num_batched_tokens=256)
    outs = llm.generate([p for p, _ in rows], SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                        use_tqdm=False,
                        lora_request=[LoRARequest(a, ids[a], adapters[a]) if a else None
                                      for _, a in rows])
    return [o.outputs[0].text for o in outs]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_per_row_adapter_column(tmp_path, setup, fmt):
    _, model, adapters = setup
    prompts = ["Hello cluster: what is GPU?", "Batch inference reads prompts", "Paged attention"]
    rows = [{"id": f"r{i}-{a}", "prompt": p, "adapter": a}
            for i, p in enumerate(prompts) for a in ("alpha", "beta", None)]
    rows.append({"id": "unknown", "prompt": "x", "adapter": "gamma"})
    (write_jsonl if fmt == "jsonl" else write_parquet)(tmp_path / "data" / f"rows.{fmt}", rows)
    config = job_config(model, f"data/rows.{fmt}", input={"adapter_field": "adapter",
                                                         "max_bad_rows": 0.5},
                        lora={"adapters": adapters, "max_loras": 1})
    job_dir = make_job(tmp_path, config)
    rc, out = run_worker(job_dir)
    assert rc == 0, out
    [records] = read_results(job_dir).values()
    got = {r["id"]: r["text"] for r in records}
    answered = rows[:-1]
    want = python_api_texts(model, adapters, [(r["prompt"], r["adapter"]) for r in answered])
    assert {r["id"]: w for r, w in zip(answered, want)} == got
    assert len(set(want[:3])) == 3      # the adapters change the answers
    [error] = read_errors(job_dir)
    assert error["id"] == "unknown" and error["kind"] == "unknown_adapter"
    assert "'gamma' is not in lora.adapters (known: alpha, beta)" in error["reason"]


def test_openai_batch_body_model_names_the_adapter(tmp_path, setup):
    _, model, adapters = setup
    def line(cid, model_name, prompt):
        return {"custom_id": cid, "method": "POST", "url": "/v1/completions",
                "body": {"model": model_name, "prompt": prompt, "max_tokens": MAX_TOKENS,
                         "temperature": 0}}
    rows = [line("a", "alpha", "Hello cluster"), line("b", "beta", "Hello cluster"),
            line("base", "tiny-llama", "Hello cluster")]
    write_jsonl(tmp_path / "data" / "batch.jsonl", rows)
    config = job_config(model, "data/batch.jsonl",
                        input={"format": "openai-batch", "id_field": None,
                               "prompt_field": None},
                        output={"format": "openai-batch"}, lora={"adapters": adapters})
    job_dir = make_job(tmp_path, config)
    rc, out = run_worker(job_dir)
    assert rc == 0, out
    [records] = read_results(job_dir).values()
    got = {r["custom_id"]: r["response"]["body"]["choices"][0]["text"] for r in records}
    want = python_api_texts(model, adapters, [("Hello cluster", "alpha"),
                                              ("Hello cluster", "beta"),
                                              ("Hello cluster", None)])
    assert got == dict(zip(["a", "b", "base"], want))
    assert len(set(want)) == 3


def test_validate_checks_each_adapter_against_the_base(tmp_path, setup):
    from hpcinfer.config import load_job
    from hpcinfer.config.errors import ConfigError
    from hpcinfer.testing.tiny import build_tiny_checkpoint
    root, model, adapters = setup
    write_jsonl(tmp_path / "data" / "rows.jsonl", [{"id": "x", "prompt": "x"}])
    other = build_tiny_checkpoint("qwen2", tmp_path / "qwen2")
    cases = {
        "rank": ({"adapters": adapters, "max_lora_rank": 4},
                 "LoRA adapter 'alpha' has rank 8, more than max_lora_rank=4"),
        "missing": ({"adapters": {"gone": str(tmp_path / "nowhere")}}, "is not a directory"),
        "other base": ({"adapters": {"q": str(build_tiny_adapter(other, tmp_path / "q",
                                                                 rank=4))}},
                       "k_proj maps 64 -> 32 features but the base's maps 64 -> 64"),
    }
    for what, (lora, message) in cases.items():
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(
            job_config(model, "data/rows.jsonl", lora=lora)))
        with pytest.raises(ConfigError) as info:
            load_job(tmp_path / "job.yaml")
        assert message in str(info.value) and info.value.key_path.startswith("lora"), what
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(
        job_config(model, "data/rows.jsonl", input={"adapter_field": "adapter"})))
    with pytest.raises(ConfigError, match="rows name adapters but lora.adapters is empty"):
        load_job(tmp_path / "job.yaml")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(
        job_config(model, "data/rows.jsonl", lora={"adapters": adapters})))
    assert set(load_job(tmp_path / "job.yaml").lora.adapters) == {"alpha", "beta"}


def test_a_container_job_binds_the_adapter_directories(tmp_path, setup):
    from hpcinfer.compile.jobdir import compile_job
    from hpcinfer.config import load_job
    _, model, adapters = setup
    write_jsonl(tmp_path / "data" / "rows.jsonl", [{"id": "x", "prompt": "x"}])
    (tmp_path / "image.sif").write_text("sif")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job_config(
        model, "data/rows.jsonl", lora={"adapters": adapters},
        container={"image": str(tmp_path / "image.sif")})))
    binds = compile_job(load_job(tmp_path / "job.yaml")).plan.container.binds
    assert set(adapters.values()) <= set(binds)


def test_validate_refuses_adapters_with_pipeline_stages(tmp_path, setup):
    from hpcinfer.config import load_job
    from hpcinfer.config.errors import ConfigError
    _, model, adapters = setup
    write_jsonl(tmp_path / "data" / "rows.jsonl", [{"id": "x", "prompt": "x"}])
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job_config(
        model, "data/rows.jsonl", lora={"adapters": adapters}, parallel={"pipeline": 2})))
    with pytest.raises(ConfigError) as info:
        load_job(tmp_path / "job.yaml")
    assert info.value.key_path == "parallel.pipeline"
    assert "split the model with parallel.tensor" in str(info.value)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job_config(
        model, "data/rows.jsonl", lora={"adapters": adapters}, parallel={"tensor": 2})))
    assert load_job(tmp_path / "job.yaml").parallel.tensor == 2
