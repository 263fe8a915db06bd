"""`hpcinfer validate` reads what the job will read (issue 16): the first rows of every input
with the worker's reader, and the checkpoint's config.json against the engine's own tables
(hpcinfer.models.support, read here, never copied), all without torch."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from hpcinfer.cli import main
from hpcinfer.compile.checkpoint import checkpoint_problem
from hpcinfer.compile.sample import DEFAULT_SAMPLE_ROWS
from hpcinfer.models import support
from hpcinfer.testing.jobs import write_job


def _validate(job, capsys, *extra) -> tuple[int, str, str]:
    rc = main(["validate", str(job), *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_misnamed_prompt_column_fails_with_file_line(tmp_path, capsys):
    job = write_job(tmp_path, input={"prompt_field": "question"})
    rc, _, err = _validate(job, capsys)
    assert rc == 2 and len(err.splitlines()) == 1
    assert "input.prompt_field: none of the first 5 rows of" in err
    assert f"{tmp_path / 'data' / 'part-0.jsonl'}:1: row has no 'question' field" in err


def test_broken_json_line_is_a_warning_with_counts_and_line(tmp_path, capsys):
    job = write_job(tmp_path)
    with open(tmp_path / "data" / "part-1.jsonl", "a") as f:
        f.write("{broken\n")
    rc, out, err = _validate(job, capsys)
    assert rc == 0 and "11 rows" in out and "10 usable" in out
    assert f"part-1.jsonl: 1 of 6 sampled rows are bad (1 invalid_json), e.g. " in err
    assert f"part-1.jsonl:6: line is not valid JSON" in err
    # The worker rounds a fraction up (5% of 6 rows allows one): no false alarm.
    assert "max_bad_rows" not in err


def test_sampled_bad_rows_over_the_budget_say_the_task_would_fail(tmp_path, capsys):
    job = write_job(tmp_path)
    with open(tmp_path / "data" / "part-1.jsonl", "a") as f:
        f.write("{broken\n[2]\n")
    rc, _, err = _validate(job, capsys)
    assert rc == 0 and "2 of 7 sampled rows are bad" in err
    assert "over input.max_bad_rows (0.05): a task with as many would stop and fail" in err


def test_every_line_broken_fails(tmp_path, capsys):
    job = write_job(tmp_path, rows=(3,))
    (tmp_path / "data" / "part-0.jsonl").write_text("nope\n[1]\n\n")
    rc, _, err = _validate(job, capsys)
    assert rc == 2 and "input.path: none of the first 3 rows" in err
    assert "1 invalid_json" in err and "1 not_object" in err and "1 blank_line" in err


def test_parquet_missing_column_names_the_key(tmp_path, capsys):
    from hpcinfer.testing.worker_jobs import write_parquet
    write_parquet(tmp_path / "pq" / "a.parquet", [{"id": "a", "text": "x"}])
    job = write_job(tmp_path, input={"path": "pq/*.parquet"})
    rc, _, err = _validate(job, capsys)
    assert rc == 2 and "input.prompt_field" in err and "has no column 'prompt'" in err


def test_prompt_template_checked_against_sampled_rows(tmp_path, capsys):
    job = write_job(tmp_path, input={"prompt_template": "Q: {{ questoin }}"})
    rc, _, err = _validate(job, capsys)
    assert rc == 2 and "input.prompt_template" in err and "'questoin' is undefined" in err
    job = write_job(tmp_path, input={"prompt_template": "Q: {{ prompt }}\nA:"})
    assert _validate(job, capsys)[0] == 0
    job = write_job(tmp_path, input={"prompt_template": "Q: {{ prompt "})
    rc, _, err = _validate(job, capsys)
    assert rc == 2 and "not valid Jinja2" in err


def test_sample_is_bounded_and_full_reads_all(tmp_path, capsys):
    job = write_job(tmp_path, rows=(DEFAULT_SAMPLE_ROWS + 50,), input={"shard_rows": 1000})
    with open(tmp_path / "data" / "part-0.jsonl", "a") as f:
        f.write("late breakage\n")
    rc, out, err = _validate(job, capsys)
    assert rc == 0 and f"read {DEFAULT_SAMPLE_ROWS} rows" in out and not err
    rc, out, err = _validate(job, capsys, "--full")
    assert rc == 0 and f"read {DEFAULT_SAMPLE_ROWS + 51} rows (all)" in out
    assert "part-0.jsonl:151: line is not valid JSON" in err


def test_large_parquet_sample_reads_only_the_first_row_group(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "pq").mkdir()
    n = 400_000
    table = pa.table({"id": pa.array(range(n)), "prompt": pa.array(["x" * 20] * n)})
    pq.write_table(table, tmp_path / "pq" / "big.parquet", row_group_size=20_000)
    job = write_job(tmp_path, input={"path": "pq/*.parquet", "shard_rows": 100_000})
    start = time.perf_counter()
    rc, out, _ = _validate(job, capsys)
    assert rc == 0 and f"read {DEFAULT_SAMPLE_ROWS} rows" in out
    assert f"ids of all {n} rows not checked for duplicates (--full does)" in out
    # what matters is that it does not grow with the file; one row group is a few ms
    assert time.perf_counter() - start < 5


def test_duplicate_ids_are_found_on_small_inputs_without_full(tmp_path, capsys):
    job = write_job(tmp_path, rows=(3, 3))
    with open(tmp_path / "data" / "part-1.jsonl", "a") as f:
        f.write('{"id": "r0", "prompt": "again"}\n')
    rc, _, err = _validate(job, capsys)
    assert rc == 2 and "duplicate id values" in err and "'r0'" in err


def test_text_input_is_validated_like_the_worker_reads_it(tmp_path, capsys):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "p.txt").write_text("one\n\ntwo\n")
    rc, out, _ = _validate(write_job(tmp_path, input={"path": "t/*.txt"}), capsys)
    assert rc == 0 and "2 rows" in out and "2 usable" in out


# -- the checkpoint's config.json --------------------------------------------------------
def _model_job(tmp_path, hf: dict, **sections):
    job = write_job(tmp_path, **sections)
    (tmp_path / "model" / "config.json").write_text(json.dumps(hf))
    return job


LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
         "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 4}


def test_unsupported_multimodal_fails_at_validate_with_the_engines_message(tmp_path, capsys):
    # LLaVA-NeXT (image tiling) is a vision-language family the engine does not run yet.
    assert "LlavaNextForConditionalGeneration" not in support.supported_architectures()
    hf = {"architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next",
          "text_config": {"num_attention_heads": 8, "num_hidden_layers": 4},
          "vision_config": {"hidden_size": 16}}
    rc, _, err = _validate(_model_job(tmp_path, hf), capsys)
    assert rc == 2 and "model.id" in err
    with pytest.raises(ValueError) as engine:
        support.architecture_of(type("C", (), {"architectures": hf["architectures"]}))
    assert str(engine.value) in err and "multimodal" in err
    assert "hpcinfer models --supported" in err


def test_every_supported_architecture_passes():
    for name in support.supported_architectures() + support.supported_architectures(True):
        assert checkpoint_problem({**LLAMA, "architectures": [name]}) is None, name


@pytest.mark.parametrize("where", ["rope_scaling", "rope_parameters", "per_layer_type"])
def test_rope_types_follow_the_table(where):
    def config(rope_type):
        rope = {"rope_type": rope_type, "factor": 2.0, "rope_theta": 10000.0}
        if where == "per_layer_type":
            return {**LLAMA, "rope_parameters": {"full_attention": {"rope_type": "default"},
                                                 "sliding_attention": rope}}
        return {**LLAMA, where: rope}
    for rope_type in support.SUPPORTED_ROPE_TYPES:
        assert checkpoint_problem(config(rope_type)) is None, rope_type
    key, message = checkpoint_problem(config("not-a-rope-type"))
    assert key == "model.id" and message == (
        f"unsupported rope_type 'not-a-rope-type'; supported: {list(support.SUPPORTED_ROPE_TYPES)}")


@pytest.mark.parametrize("old_name", ["su", "yarn"])
def test_first_phi3_releases_rope_names_pass_as_transformers_loads_them(old_name):
    from transformers import Phi3Config
    rope = {"type": old_name, "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}
    hf = {**LLAMA, "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
          "rope_scaling": rope, "original_max_position_embeddings": 64}
    assert checkpoint_problem(hf) is None
    loaded = Phi3Config(hidden_size=64, num_attention_heads=8,
                        rope_scaling={**rope, "original_max_position_embeddings": 64},
                        max_position_embeddings=128, original_max_position_embeddings=64)
    assert loaded.rope_parameters["rope_type"] == "longrope"
    # elsewhere the old name means nothing: refused as before
    assert checkpoint_problem({**LLAMA, "rope_scaling": {"type": "su"}})[1].startswith(
        "unsupported rope_type 'su'")


def test_unsupported_quantization_fails(tmp_path, capsys):
    method = "hqq"
    assert method not in support.SUPPORTED_QUANT_METHODS
    hf = {**LLAMA, "quantization_config": {"quant_method": method, "bits": 4}}
    rc, _, err = _validate(_model_job(tmp_path, hf), capsys)
    assert rc == 2 and "quantization hqq: unknown quant_method 'hqq'; " \
                      "hpcinfer supports fp8" in err


def test_quantization_with_groups_split_by_tensor_parallel_fails(tmp_path, capsys):
    # 4-bit groups of 128 over 512 / 8 = 64 input features per rank of o_proj
    hf = {**LLAMA, "hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 8,
          "intermediate_size": 1024,
          "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128,
                                  "zero_point": True, "version": "gemm"}}
    job = _model_job(tmp_path, hf, parallel={"tensor": 8, "replicas": 1})
    rc, _, err = _validate(job, capsys)
    assert rc == 2 and "quantization awq: 4-bit weights need" in err and "group size 128" in err


def test_heads_not_divisible_by_tensor(tmp_path, capsys):
    hf = {**LLAMA, "num_attention_heads": 6, "num_key_value_heads": 6}
    job = _model_job(tmp_path, hf, parallel={"tensor": 4, "replicas": 1})
    rc, _, err = _validate(job, capsys)
    assert rc == 2 and "parallel.tensor" in err and "6 attention heads" in err


def test_a_supported_checkpoint_validates(tmp_path, capsys):
    assert _validate(_model_job(tmp_path, LLAMA), capsys)[0] == 0


def test_models_supported_lists_the_tables_without_torch():
    code = ("import sys, json, contextlib, io\nfrom hpcinfer.cli import main\n"
            "buf = io.StringIO()\nwith contextlib.redirect_stdout(buf):\n"
            "    rc = main(['models', '--supported', '--json'])\n"
            "print(json.dumps([rc, json.loads(buf.getvalue()), "
            "[m for m in ('torch', 'transformers', 'triton') if m in sys.modules]]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    rc, table, heavy = json.loads(proc.stdout.splitlines()[-1])
    assert rc == 0 and heavy == []
    assert table["architectures"] == support.supported_architectures()
    assert table["rope_types"] == list(support.SUPPORTED_ROPE_TYPES)


# -- the new input/output keys at load time ------------------------------------------------
@pytest.mark.parametrize("value, ok", [(0, True), (10, True), (0.05, True), (1.0, True),
                                       (-1, False), (0.0, False), (1.5, False), ("5%", False),
                                       (True, False)])
def test_max_bad_rows_is_a_count_or_a_fraction(tmp_path, value, ok):
    from hpcinfer.config import ConfigError, load_job
    job = write_job(tmp_path, input={"max_bad_rows": value})
    if ok:
        assert load_job(job).input.max_bad_rows == value
        return
    with pytest.raises(ConfigError) as info:
        load_job(job)
    assert info.value.key_path == "input.max_bad_rows" and "fraction in (0, 1]" in info.value.fix


def test_max_bad_rows_default_is_five_percent(tmp_path):
    from hpcinfer.config import load_job
    assert load_job(write_job(tmp_path)).input.max_bad_rows == 0.05


@pytest.mark.parametrize("sections, key, words", [
    ({"task": "chat", "input": {"messages_field": "m", "prompt_template": "{{ m }}"}},
     "input.prompt_template", "does not read"),
    ({"input": {"prompt_template": "{% if %}"}}, "input.prompt_template", "not valid Jinja2"),
    ({"output": {"text_field": "id"}}, "output.text_field", "already an output column"),
    ({"output": {"text_field": "prompt"}, "input": {"passthrough": ["prompt"]}},
     "output.text_field", "already an output column"),
])
def test_template_and_text_field_errors_at_load(tmp_path, sections, key, words):
    from hpcinfer.config import ConfigError, load_job
    with pytest.raises(ConfigError) as info:
        load_job(write_job(tmp_path, **sections))
    assert info.value.key_path == key and words in info.value.problem


def test_template_without_prompt_field_is_fine(tmp_path):
    from hpcinfer.config import load_job
    cfg = load_job(write_job(tmp_path, input={"prompt_field": None,
                                              "prompt_template": "Q: {{ prompt }}"}))
    assert cfg.input.prompt_field is None


def test_pooling_job_may_pass_a_text_column_through(tmp_path):
    from hpcinfer.config import load_job
    cfg = load_job(write_job(tmp_path, task="embed",
                             input={"prompt_field": None, "text_field": "text",
                                    "passthrough": ["text"]}))
    assert cfg.input.passthrough == ("text",)


def test_hf_overrides_are_checked_as_the_engine_will_load_them(tmp_path, capsys):
    """model.hf_overrides merge over config.json before the checks: an override to an
    architecture or rope type the engine lacks fails at validate, one that fixes the
    checkpoint passes; a non-mapping is refused with what to write."""
    bad_rope = {**LLAMA, "rope_scaling": {"rope_type": "not-a-rope-type"}}
    rc, _, err = _validate(_model_job(tmp_path / "a", bad_rope), capsys)
    assert rc == 2 and "not-a-rope-type" in err
    fixed = {"hf_overrides": {"rope_scaling": {"rope_type": "yarn", "factor": 2.0,
                                               "original_max_position_embeddings": 64}}}
    assert _validate(_model_job(tmp_path / "b", bad_rope, model={"id": "./model", **fixed}),
                     capsys)[0] == 0
    job = _model_job(tmp_path / "c", LLAMA, model={
        "id": "./model", "hf_overrides": {"architectures": ["NotAModelForCausalLM"]}})
    rc, _, err = _validate(job, capsys)
    assert rc == 2 and "NotAModelForCausalLM" in err and "model.id" in err
    job = _model_job(tmp_path / "d", LLAMA, model={"id": "./model", "hf_overrides": [1, 2]})
    rc, _, err = _validate(job, capsys)
    assert rc == 2 and "hf_overrides must be a non-empty mapping" in err
