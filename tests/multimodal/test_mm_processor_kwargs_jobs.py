"""input.mm_processor_kwargs (docs/vision.md): the job's processor arguments reach the model's
processor for every row with images. With the tiny Qwen2-VL, smaller max_pixels means fewer
image tokens per image; the worker's rows equal LLM.generate with the same kwargs (text and
prompt token counts), and differ from the same job without them. On the login side the key
must be a mapping, on a vision-language model, for tasks generate or chat.

The worker runs as a subprocess through its real entry (hpcinfer.worker.task.main) with the
one change the Qwen tests make everywhere: AutoProcessor answers with transformers'
Qwen2VLProcessor without its torchvision-only video part (hpcinfer.testing.tiny_vision).

Per row (input.mm_processor_kwargs_field): a row's mapping is merged over the job's key by
key; each row equals LLM.generate with its merged kwargs (the oracle without prefix caching,
the job with it and 8-token blocks, so image blocks are shared wherever hashes allow). Rows
with equal merged kwargs share the image's KV blocks; a row whose kwargs change the pixels
but not the token ids (do_normalize: false) shares none. A value that is not a mapping, or
arguments the processor refuses, make that row a bad row and nothing else."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hpcinfer.config import load_job
from hpcinfer.testing.worker_jobs import (job_config, make_job, read_errors, read_results,
                                          worker_env, write_jsonl)

PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n" \
         "<|im_start|>assistant\n"
# The tiny processor's own bounds are 2..12 merged tokens (28 x 28 pixels each); these allow 4.
SMALL = {"min_pixels": 28 * 28 * 2, "max_pixels": 28 * 28 * 4}
SIZES = [(112, 112), (84, 56)]   # (width, height): 9 and 6 image tokens by default, 4 and 2 here

WORKER = """
import os, sys
import transformers
from hpcinfer.testing.tiny_vision import qwen2_vl_image_processor
model = os.path.realpath(sys.argv[2])
processor = qwen2_vl_image_processor(model, "2")
original = transformers.AutoProcessor.from_pretrained
def from_pretrained(where, *args, **kwargs):
    if os.path.realpath(str(where)) == model:
        return processor
    return original(where, *args, **kwargs)
transformers.AutoProcessor.from_pretrained = from_pretrained
from hpcinfer.worker.task import main
sys.exit(main([sys.argv[1]]))
"""


@pytest.fixture(scope="module")
def qwen_dir():
    from hpcinfer.testing.tiny_vision import tiny_qwen2_vl
    return str(tiny_qwen2_vl("2"))


def _images(directory):
    rng = np.random.default_rng(5)
    paths = []
    for i, (w, h) in enumerate(SIZES):
        path = directory / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(path)
        paths.append(path)
    return paths


def _run_job(tmp_path, name, qwen_dir, data, media, *, num_bad=0, engine=None,
             **input_keys):
    """Run a JSONL image job through the worker -> ({id: result row}, errors.jsonl records)."""
    job = make_job(tmp_path / name, job_config(
        qwen_dir, str(data), input={"image_field": "image", "media_dirs": [str(media)],
                                    "max_bad_rows": num_bad, **input_keys},
        model={"id": qwen_dir, "max_model_len": 128},
        **({"engine": engine} if engine else {})))
    proc = subprocess.run([sys.executable, "-c", WORKER, str(job), qwen_dir],
                          env=worker_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = read_errors(job)
    assert len(errors) == num_bad, errors
    return {r["id"]: r for r in read_results(job)[0]}, errors


def test_job_kwargs_change_image_tokens_as_llm_generate(tmp_path, qwen_dir, monkeypatch):
    media = tmp_path / "media"
    media.mkdir()
    paths = _images(media)
    data = write_jsonl(media / "rows.jsonl", [{"id": f"r{i}", "prompt": PROMPT,
                                               "image": p.name} for i, p in enumerate(paths)])
    small, _ = _run_job(tmp_path, "small", qwen_dir, data, media, mm_processor_kwargs=SMALL)
    default, _ = _run_job(tmp_path, "default", qwen_dir, data, media)

    from hpcinfer import LLM, SamplingParams
    from hpcinfer.testing.tiny_vision import qwen2_vl_image_processor, use_processor
    use_processor(monkeypatch, qwen_dir, qwen2_vl_image_processor(qwen_dir, "2"))
    llm = LLM(qwen_dir, device="cpu", dtype="float32", max_num_seqs=4, max_model_len=128)
    params = SamplingParams(temperature=0.0, max_tokens=6)   # the job's sampling block
    images = [Image.open(p).convert("RGB") for p in paths]

    def api(kwargs):
        prompts = [{"prompt": PROMPT, "multi_modal_data": {"image": im},
                    **({"mm_processor_kwargs": kwargs} if kwargs else {})} for im in images]
        return llm.generate(prompts, params, use_tqdm=False)

    for rows, outs, image_tokens in ((small, api(SMALL), [4, 2]), (default, api(None), [9, 6])):
        for i, out in enumerate(outs):
            row = rows[f"r{i}"]
            assert row["text"] == out.outputs[0].text
            assert row["num_prompt_tokens"] == len(out.prompt_token_ids)
            assert out.prompt_token_ids.count(llm.llm_engine.multimodal.image_token_id) == \
                image_tokens[i]
    assert [default[f"r{i}"]["num_prompt_tokens"] - small[f"r{i}"]["num_prompt_tokens"]
            for i in range(2)] == [5, 4]


# Per-row kwargs, all on image 0 (112 x 112: 9 image tokens by default, 4 with SMALL); the job
# sets SMALL and reads the rows' kwargs from column "kwargs" (absent = the job's).
ROW_KWARGS = {
    "job": ...,                                  # no kwargs column in the row
    "larger": {"max_pixels": 28 * 28 * 12},      # min_pixels stays the job's: 9 tokens
    "raw": {"do_normalize": False},              # other pixels, the same token ids as "job"
    "same": json.dumps({"max_pixels": SMALL["max_pixels"],        # SMALL as JSON text
                        "min_pixels": SMALL["min_pixels"]}),      # (a Parquet string column)
    "null": None,                                # null: the job's
}
MERGED = {"job": SMALL, "larger": {**SMALL, "max_pixels": 28 * 28 * 12},
          "raw": {**SMALL, "do_normalize": False}, "same": SMALL, "null": SMALL}
BAD_ROWS = {"not_mapping": [28 * 28 * 2, 28 * 28 * 4], "refused": {"max_pixels": "big"}}


def test_row_kwargs_merge_over_the_job_kwargs_as_llm_generate(tmp_path, qwen_dir,
                                                              monkeypatch):
    media = tmp_path / "media"
    media.mkdir()
    image = _images(media)[0]
    rows = [{"id": key, "prompt": PROMPT, "image": image.name,
             **({} if kwargs is ... else {"kwargs": kwargs})}
            for key, kwargs in {**ROW_KWARGS, **BAD_ROWS}.items()]
    data = write_jsonl(media / "rows.jsonl", rows)
    results, errors = _run_job(tmp_path, "rows", qwen_dir, data, media, num_bad=2,
                               engine={"block_size": 8}, mm_processor_kwargs=SMALL,
                               mm_processor_kwargs_field="kwargs")

    by_id = {e["id"]: e for e in errors}
    assert by_id["not_mapping"]["kind"] == "invalid_mm_processor_kwargs"
    assert by_id["not_mapping"]["reason"].startswith(
        "'kwargs' is not a mapping (got list): write a mapping")
    assert by_id["refused"]["kind"] == "bad_image"
    assert "max_pixels" in by_id["refused"]["reason"]
    assert "from input.mm_processor_kwargs merged with the row's own" in \
        by_id["refused"]["reason"]
    assert sorted(results) == sorted(ROW_KWARGS)

    from hpcinfer import LLM, SamplingParams
    from hpcinfer.testing.tiny_vision import qwen2_vl_image_processor, use_processor
    use_processor(monkeypatch, qwen_dir, qwen2_vl_image_processor(qwen_dir, "2"))
    llm = LLM(qwen_dir, device="cpu", dtype="float32", max_num_seqs=4, max_model_len=128,
              enable_prefix_caching=False)   # the oracle shares no KV at all
    pil = Image.open(image).convert("RGB")
    keys = list(MERGED)
    outs = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": pil},
                          "mm_processor_kwargs": MERGED[k]} for k in keys],
                        SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)
    for key, out in zip(keys, outs):
        assert results[key]["text"] == out.outputs[0].text, key
        assert results[key]["num_prompt_tokens"] == len(out.prompt_token_ids), key
    assert results["larger"]["num_prompt_tokens"] == results["job"]["num_prompt_tokens"] + 5
    # "raw" has "job"'s token ids: had it shared "job"'s image blocks, it would answer alike
    assert results["raw"]["num_prompt_tokens"] == results["job"]["num_prompt_tokens"]
    assert results["raw"]["text"] != results["job"]["text"]


def test_rows_share_image_kv_only_with_equal_merged_kwargs(qwen_dir, monkeypatch):
    """The worker's requests (RequestBuilder) in one engine with prefix caching and 8-token
    blocks: a row whose merged kwargs equal an earlier row's takes its image blocks from the
    cache, a row with other kwargs (same token ids) takes none."""
    from hpcinfer import LLM, SamplingParams
    from hpcinfer.io.rows import InputRow
    from hpcinfer.testing.tiny_vision import qwen2_vl_image_processor, use_processor
    from hpcinfer.worker.requests import RequestBuilder
    use_processor(monkeypatch, qwen_dir, qwen2_vl_image_processor(qwen_dir, "2"))
    llm = LLM(qwen_dir, device="cpu", dtype="float32", max_num_seqs=4, max_model_len=128,
              block_size=8)
    engine = llm.llm_engine
    builder = RequestBuilder(engine.tokenizer, {"temperature": 0.0, "max_tokens": 4}, 128,
                             multimodal=engine.multimodal, mm_processor_kwargs=SMALL)
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (112, 112, 3),
                                                              dtype=np.uint8), "RGB")
    rows = {"job": {}, "same": {"max_pixels": SMALL["max_pixels"]},   # merged: SMALL again
            "raw": {"do_normalize": False}, "raw_again": {"do_normalize": False}}
    requests = {key: builder.build(InputRow(i, "rows.jsonl", key, key, prompt=PROMPT,
                                            images=(image,), mm_processor_kwargs=kwargs))
                for i, (key, kwargs) in enumerate(rows.items())}
    hashes = {key: r.prompt.mm_inputs.items[0].hash for key, r in requests.items()}
    assert hashes["same"] == hashes["job"] == builder.build(InputRow(
        9, "rows.jsonl", "x", "x", prompt=PROMPT, images=(image,),
        mm_processor_kwargs={"max_pixels": SMALL["max_pixels"],
                             "min_pixels": SMALL["min_pixels"]})).prompt.mm_inputs.items[0].hash
    assert hashes["raw"] == hashes["raw_again"] != hashes["job"]
    assert requests["raw"].prompt.token_ids == requests["job"].prompt.token_ids

    cached = {key: llm.generate([r.prompt], r.params, use_tqdm=False)[0].num_cached_tokens
              for key, r in requests.items()}     # one at a time: each sees the ones before
    # a hit covers the full blocks before the prompt's last token (that one is computed)
    num_hit = (len(requests["job"].prompt.token_ids) - 1) // 8 * 8
    assert num_hit > max(i for i, t in enumerate(requests["job"].prompt.token_ids)
                         if t == engine.multimodal.image_token_id)   # the image included
    assert cached == {"job": 0, "same": num_hit, "raw": 0, "raw_again": num_hit}


def test_row_kwargs_read_from_parquet_struct_and_json_text_and_openai_bodies(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from hpcinfer.io.readers import ShardReader
    from hpcinfer.io.rows import BadRow, InputSpec

    class Shard:
        def __init__(self, file, stop):
            self.file, self.start, self.stop = file, 0, stop

    struct = pa.array([{"max_pixels": 3136, "min_pixels": None}, None,
                       {"max_pixels": None, "min_pixels": 1568}])
    text = pa.array(['{"max_pixels": 3136}', None, "max_pixels=3136"])
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "prompt": ["p"] * 3, "kw": struct,
                             "kw_text": text}), path)
    spec = InputSpec(mm_processor_kwargs_field="kw")
    assert spec.columns() == ["id", "prompt", "kw"]
    rows = list(ShardReader(Shard(path, 3), spec))
    # a struct fills the keys a row does not set with null: those keep the job's values
    assert [r.mm_processor_kwargs for r in rows] == [{"max_pixels": 3136}, {},
                                                      {"min_pixels": 1568}]
    rows = list(ShardReader(Shard(path, 3), InputSpec(mm_processor_kwargs_field="kw_text")))
    assert [r.mm_processor_kwargs for r in rows[:2]] == [{"max_pixels": 3136}, {}]
    assert isinstance(rows[2], BadRow) and rows[2].kind == "invalid_mm_processor_kwargs"
    assert rows[2].reason.startswith("'kw_text' is text that is not JSON: write a mapping")

    lines = tmp_path / "batch.jsonl"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    write_jsonl(lines, [
        {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
         "body": {**body, "mm_processor_kwargs": {"max_pixels": 3136}}},
        {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": body},
        {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
         "body": {**body, "mm_processor_kwargs": 3136}}])
    rows = list(ShardReader(Shard(lines, 3), InputSpec(task="chat", format="openai-batch")))
    assert [r.mm_processor_kwargs for r in rows[:2]] == [{"max_pixels": 3136}, {}]
    assert rows[0].sampling == {"max_tokens": 2}
    assert rows[2].kind == "invalid_mm_processor_kwargs"
    assert rows[2].reason.startswith(
        "body.mm_processor_kwargs is not a mapping (got int): write a mapping")


def test_login_side_checks(model_dir, job_file, config_error):
    vlm = model_dir("vlm", vision=True)
    cfg = load_job(job_file(vlm, "  mm_processor_kwargs: {max_pixels: 3136}\n"
                                 "  mm_processor_kwargs_field: kwargs\n"))
    assert cfg.input.mm_processor_kwargs == {"max_pixels": 3136}
    assert cfg.input.mm_processor_kwargs_field == "kwargs"
    err = config_error(job_file(vlm, "  mm_processor_kwargs: [max_pixels, 3136]\n"))
    assert err.key_path == "input.mm_processor_kwargs"
    assert "must be a mapping" in err.problem and "min_pixels" in err.fix
    for key in ("mm_processor_kwargs: {max_pixels: 1}", "mm_processor_kwargs_field: kwargs"):
        err = config_error(job_file(vlm, f"  {key}\n  text_field: t\n", task="embed"))
        assert err.key_path == f"input.{key.split(':')[0]}" and "task embed" in err.problem
    err = config_error(job_file(vlm, "  mm_processor_kwargs_field: kwargs\n"
                                     "  format: openai-batch\n", task="chat"))
    assert err.key_path == "input.mm_processor_kwargs_field"
    assert "body.mm_processor_kwargs" in err.problem
    llm = model_dir("llm", vision=False)
    for key in ("mm_processor_kwargs: {max_pixels: 3136}", "mm_processor_kwargs_field: kw"):
        err = config_error(job_file(llm, f"  {key}\n"))
        assert err.key_path == f"input.{key.split(':')[0]}" and "takes no images" in err.problem
