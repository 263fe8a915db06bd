"""input.mm_processor_kwargs (docs/vision.md): the job's processor arguments reach the model's
processor for every row with images. With the tiny Qwen2-VL, smaller max_pixels means fewer
image tokens per image; the worker's rows equal LLM.generate with the same kwargs (text and
prompt token counts), and differ from the same job without them. On the login side the key
must be a mapping, on a vision-language model, for tasks generate or chat.

The worker runs as a subprocess through its real entry (hpcinfer.worker.task.main) with the
one change the Qwen tests make everywhere: AutoProcessor answers with transformers'
Qwen2VLProcessor without its torchvision-only video part (hpcinfer.testing.tiny_vision)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hpcinfer.config import ConfigError, load_job
from hpcinfer.testing.jobs import write_job_text
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


def _run_job(tmp_path, name, qwen_dir, data, media, **input_keys):
    job = make_job(tmp_path / name, job_config(
        qwen_dir, str(data), input={"image_field": "image", "media_dirs": [str(media)],
                                    "max_bad_rows": 0, **input_keys},
        model={"id": qwen_dir, "max_model_len": 128}))
    proc = subprocess.run([sys.executable, "-c", WORKER, str(job), qwen_dir],
                          env=worker_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert read_errors(job) == []
    return {r["id"]: r for r in read_results(job)[0]}


def test_job_kwargs_change_image_tokens_as_llm_generate(tmp_path, qwen_dir, monkeypatch):
    media = tmp_path / "media"
    media.mkdir()
    paths = _images(media)
    data = write_jsonl(media / "rows.jsonl", [{"id": f"r{i}", "prompt": PROMPT,
                                               "image": p.name} for i, p in enumerate(paths)])
    small = _run_job(tmp_path, "small", qwen_dir, data, media, mm_processor_kwargs=SMALL)
    default = _run_job(tmp_path, "default", qwen_dir, data, media)

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


def _model_dir(tmp_path, vision: bool):
    path = tmp_path / ("vlm" if vision else "llm")
    path.mkdir()
    config = {"architectures": ["Qwen2VLForConditionalGeneration" if vision
                                else "Qwen2ForCausalLM"]}
    if vision:
        config["vision_config"] = {"model_type": "qwen2_vl"}
    (path / "config.json").write_text(json.dumps(config))
    return path


def _job(tmp_path, model, extra: str, task: str = "generate"):
    return write_job_text(tmp_path, f"name: t\ntask: {task}\nmodel: {{id: {model}}}\n"
                                    f"input:\n  path: data/*.jsonl\n{extra}")


def _error(path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_job(path)
    return info.value


def test_login_side_checks(tmp_path):
    vlm = _model_dir(tmp_path, vision=True)
    cfg = load_job(_job(tmp_path, vlm, "  mm_processor_kwargs: {max_pixels: 3136}\n"))
    assert cfg.input.mm_processor_kwargs == {"max_pixels": 3136}
    err = _error(_job(tmp_path, vlm, "  mm_processor_kwargs: [max_pixels, 3136]\n"))
    assert err.key_path == "input.mm_processor_kwargs"
    assert "must be a mapping" in err.problem and "min_pixels" in err.fix
    err = _error(_job(tmp_path, vlm, "  mm_processor_kwargs: {max_pixels: 1}\n"
                                     "  text_field: t\n", task="embed"))
    assert err.key_path == "input.mm_processor_kwargs" and "task embed" in err.problem
    err = _error(_job(tmp_path, _model_dir(tmp_path, vision=False),
                      "  mm_processor_kwargs: {max_pixels: 3136}\n"))
    assert err.key_path == "input.mm_processor_kwargs" and "takes no images" in err.problem
