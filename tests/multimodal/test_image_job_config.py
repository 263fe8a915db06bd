"""Image keys of a job file, checked on the login node (no torch, no PIL): image_field only for
tasks generate and chat and a vision-language model, media_dirs must exist and become absolute.
The job files and model directories come from conftest.py (model_dir, job_file, config_error)."""
from __future__ import annotations

import subprocess
import sys

from hpcinfer.config import load_job


def test_image_keys_on_a_vision_model_load_with_media_dirs_absolute(tmp_path, model_dir,
                                                                    job_file):
    llava = model_dir("llava", vision=True)
    (tmp_path / "media").mkdir()
    cfg = load_job(job_file(llava, "  image_field: image\n  media_dirs: media\n"
                                   "  limit_mm_per_prompt: {image: 2}\n"))
    assert cfg.input.image_field == "image"
    assert cfg.input.media_dirs == (str(tmp_path / "media"),)
    assert cfg.input.limit_mm_per_prompt == {"image": 2}


def test_image_field_on_a_text_model_is_refused(model_dir, job_file, config_error):
    llama = model_dir("llama", vision=False)
    err = config_error(job_file(llama, "  image_field: image\n"))
    assert err.key_path == "input.image_field"
    assert "takes no images" in err.problem and "LlamaForCausalLM" in err.problem


def test_image_field_for_generate_and_chat_only(model_dir, job_file, config_error):
    llava = model_dir("llava", vision=True)
    cfg = load_job(job_file(llava, "  image_field: image\n  messages_field: m\n",
                            task="chat"))
    assert cfg.input.image_field == "image"
    err = config_error(job_file(llava, "  image_field: image\n  text_field: t\n",
                                task="embed"))
    assert err.key_path == "input.image_field"
    assert "task embed does not read an image column" in err.problem
    err = config_error(job_file(llava, "  image_field: image\n  format: openai-batch\n",
                                task="chat"))
    assert "image_url parts" in err.problem


def test_missing_media_dir_and_bad_limit(model_dir, job_file, config_error):
    llava = model_dir("llava", vision=True)
    err = config_error(job_file(llava, "  media_dirs: [nowhere]\n"))
    assert err.key_path == "input.media_dirs.0" and "is not a directory" in err.problem
    err = config_error(job_file(llava, "  limit_mm_per_prompt: {video: 1}\n"))
    assert "limit_mm_per_prompt" in err.key_path


def test_image_keys_import_nothing_heavy(tmp_path, model_dir, job_file):
    llava = model_dir("llava", vision=True)
    (tmp_path / "media").mkdir()
    path = job_file(llava, "  image_field: image\n  media_dirs: media\n"
                           "  mm_processor_kwargs_field: kwargs\n")
    code = ("import sys; from hpcinfer.config import load_job; load_job(sys.argv[1]); "
            "heavy = [m for m in ('torch', 'PIL', 'transformers') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"
