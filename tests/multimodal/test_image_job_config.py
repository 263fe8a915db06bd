"""Image keys of a job file, checked on the login node (no torch, no PIL): image_field only for
tasks generate and chat and a vision-language model, media_dirs must exist and become absolute."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hpcinfer.config import ConfigError, load_job
from hpcinfer.testing.jobs import write_job_text


def model_dir(tmp_path, name, vision: bool):
    path = tmp_path / name
    path.mkdir()
    config = {"architectures": ["LlavaForConditionalGeneration" if vision
                                else "LlamaForCausalLM"]}
    if vision:
        config["vision_config"] = {"model_type": "clip_vision_model"}
    (path / "config.json").write_text(json.dumps(config))
    return path


def job(tmp_path, model, input_extra: str, task: str = "generate"):
    return write_job_text(tmp_path, f"name: t\ntask: {task}\nmodel: {{id: {model}}}\n"
                                    f"input:\n  path: data/*.jsonl\n{input_extra}")


def error_of(path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_job(path)
    return info.value


def test_image_keys_on_a_vision_model_load_with_media_dirs_absolute(tmp_path):
    llava = model_dir(tmp_path, "llava", vision=True)
    (tmp_path / "media").mkdir()
    cfg = load_job(job(tmp_path, llava, "  image_field: image\n  media_dirs: media\n"
                                        "  limit_mm_per_prompt: {image: 2}\n"))
    assert cfg.input.image_field == "image"
    assert cfg.input.media_dirs == (str(tmp_path / "media"),)
    assert cfg.input.limit_mm_per_prompt == {"image": 2}


def test_image_field_on_a_text_model_is_refused(tmp_path):
    llama = model_dir(tmp_path, "llama", vision=False)
    err = error_of(job(tmp_path, llama, "  image_field: image\n"))
    assert err.key_path == "input.image_field"
    assert "takes no images" in err.problem and "LlamaForCausalLM" in err.problem


def test_image_field_for_generate_and_chat_only(tmp_path):
    llava = model_dir(tmp_path, "llava", vision=True)
    cfg = load_job(job(tmp_path, llava, "  image_field: image\n  messages_field: m\n",
                       task="chat"))
    assert cfg.input.image_field == "image"
    err = error_of(job(tmp_path, llava, "  image_field: image\n  text_field: t\n",
                       task="embed"))
    assert err.key_path == "input.image_field"
    assert "task embed does not read an image column" in err.problem
    err = error_of(job(tmp_path, llava, "  image_field: image\n  format: openai-batch\n",
                       task="chat"))
    assert "image_url parts" in err.problem


def test_missing_media_dir_and_bad_limit(tmp_path):
    llava = model_dir(tmp_path, "llava", vision=True)
    err = error_of(job(tmp_path, llava, "  media_dirs: [nowhere]\n"))
    assert err.key_path == "input.media_dirs.0" and "is not a directory" in err.problem
    err = error_of(job(tmp_path, llava, "  limit_mm_per_prompt: {video: 1}\n"))
    assert "limit_mm_per_prompt" in err.key_path


def test_image_keys_import_nothing_heavy(tmp_path):
    llava = model_dir(tmp_path, "llava", vision=True)
    (tmp_path / "media").mkdir()
    path = job(tmp_path, llava, "  image_field: image\n  media_dirs: media\n")
    code = ("import sys; from hpcinfer.config import load_job; load_job(sys.argv[1]); "
            "heavy = [m for m in ('torch', 'PIL', 'transformers') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"
