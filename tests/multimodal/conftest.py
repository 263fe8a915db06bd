"""Fixtures for the image tests: one thread, tiny LLaVA checkpoints, transformers as the oracle,
and job files with image keys for the login-side checks (config only, no torch)."""
from __future__ import annotations

import json

import pytest
import torch

from hpcinfer.testing.pytest_fixtures import one_torch_thread  # noqa: F401

MAX_NEW = 12


@pytest.fixture(autouse=True)
def no_preprocess_workers(monkeypatch):
    """Image prompts are preprocessed in this process unless a test asks for worker
    processes (test_preprocess_workers.py): a test's LLM then starts none, whatever the
    cores of the machine (multimodal/workers.py)."""
    from hpcinfer.multimodal.workers import ENV_WORKERS
    monkeypatch.setenv(ENV_WORKERS, "0")


@pytest.fixture(scope="session")
def hf_llava():
    """hf_llava(path) -> generate(text | messages, images) giving transformers' greedy
    continuation (fp32, never stopping at EOS) and the prompt's token ids."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    loaded = {}

    def load(path):
        if path not in loaded:
            model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
            model.generation_config.eos_token_id = None
            loaded[path] = (AutoProcessor.from_pretrained(path), model.eval())
        return loaded[path]

    def generate(path, text=None, images=None, messages=None, max_new=MAX_NEW):
        from hpcinfer.testing.tiny_vision import hf_generate
        processor, model = load(str(path))
        return hf_generate(model, processor, text, images, messages, max_new)
    return generate


@pytest.fixture(scope="session")
def llava_dir():
    from hpcinfer.testing.tiny_vision import tiny_llava
    return str(tiny_llava())


@pytest.fixture(scope="session")
def images():
    from hpcinfer.testing.tiny_vision import test_images
    return test_images()


@pytest.fixture
def model_dir(tmp_path):
    """model_dir(name, vision) -> tmp_path/name holding only a config.json: LLaVA's (with a
    vision_config) or a Llama's. The login-side checks read nothing else of a model."""
    def make(name: str, vision: bool):
        path = tmp_path / name
        path.mkdir()
        config = {"architectures": ["LlavaForConditionalGeneration" if vision
                                    else "LlamaForCausalLM"]}
        if vision:
            config["vision_config"] = {"model_type": "clip_vision_model"}
        (path / "config.json").write_text(json.dumps(config))
        return path
    return make


@pytest.fixture
def job_file(tmp_path):
    """job_file(model, input_extra, task="generate") -> a job file over data/*.jsonl whose
    input block ends with ``input_extra`` (YAML lines indented by two spaces)."""
    from hpcinfer.testing.jobs import write_job_text

    def write(model, input_extra: str, task: str = "generate"):
        return write_job_text(tmp_path, f"name: t\ntask: {task}\nmodel: {{id: {model}}}\n"
                                        f"input:\n  path: data/*.jsonl\n{input_extra}")
    return write


@pytest.fixture
def config_error():
    """config_error(path) -> the ConfigError that loading the job file raises (the test
    fails if it loads)."""
    from hpcinfer.config import ConfigError, load_job

    def error_of(path) -> ConfigError:
        with pytest.raises(ConfigError) as info:
            load_job(path)
        return info.value
    return error_of
