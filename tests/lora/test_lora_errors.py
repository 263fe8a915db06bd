"""Bad adapters and bad lora_request arguments: one clear error each, raised before anything
is queued, and the engine goes on serving afterwards."""
from __future__ import annotations

import json
import shutil

import pytest

from hpcinfer import LLM, SamplingParams
from hpcinfer.lora.adapter_config import read_adapter_config
from hpcinfer.lora.request import LoRARequest


@pytest.fixture(scope="module")
def llm(base):
    return LLM(base("llama"), device="cpu", enable_lora=True, max_loras=2, max_lora_rank=8,
               max_model_len=64)


def run(llm, lora, prompts=([5, 6, 7],)):
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    return llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params,
                        use_tqdm=False, lora_request=lora)


def copy_adapter(src, dst):
    shutil.copytree(src, dst)
    return dst


def rename_tensors(path, old, new):
    from safetensors.torch import load_file, save_file
    f = path / "adapter_model.safetensors"
    tensors = load_file(str(f))
    save_file({k.replace(old, new): v for k, v in tensors.items()}, str(f))


def test_rank_above_max_lora_rank_says_what_to_raise(llm, adapter):
    path = adapter("llama", "all-r16", rank=16)
    with pytest.raises(ValueError, match=r"prompt 0: .*rank 16, more than max_lora_rank=8: "
                                         r"raise max_lora_rank to at least 16"):
        run(llm, LoRARequest("big", 7, path))


def test_adapter_of_another_base_is_refused(llm, adapter):
    path = adapter("qwen2", "all-r8-other", rank=8)   # 2 KV heads: k/v_proj are 32 wide
    with pytest.raises(ValueError, match=r"k_proj maps 64 -> 32 features but this model's "
                                         r"maps 64 -> 64: the adapter was trained for another"):
        run(llm, LoRARequest("qwen", 8, path))


def test_target_the_base_does_not_have(llm, adapter, tmp_path):
    path = copy_adapter(adapter("llama", "all-r8", rank=8, alpha=24.0), tmp_path / "a")
    rename_tensors(path, "layers.1.", "layers.9.")
    with pytest.raises(ValueError, match=r"targets model\.layers\.9\.\w+\.\w+_proj, "
                                         "which this model does not have"):
        run(llm, LoRARequest("deep", 9, str(path)))


def test_unsupported_target_and_options(adapter, tmp_path):
    path = copy_adapter(adapter("llama", "all-r8", rank=8, alpha=24.0), tmp_path / "a")
    rename_tensors(path, "self_attn.q_proj", "self_attn.q_lin")
    with pytest.raises(ValueError, match="targets model.layers.0.self_attn.q_lin; hpcinfer "
                                         "applies LoRA to q_proj, k_proj"):
        read_adapter_config(path)
    path = copy_adapter(adapter("llama", "all-r8", rank=8, alpha=24.0), tmp_path / "b")
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="uses DoRA.*merge_and_unload"):
        read_adapter_config(path)


def test_missing_path_and_files(llm, adapter, tmp_path):
    with pytest.raises(ValueError, match=r"is not a directory: give the PEFT adapter directory"):
        run(llm, LoRARequest("gone", 3, str(tmp_path / "nowhere")))
    path = copy_adapter(adapter("llama", "all-r8", rank=8, alpha=24.0), tmp_path / "a")
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"adapter_model.safetensors is missing"):
        run(llm, LoRARequest("empty", 4, str(path)))


def test_bad_arguments(llm, base, adapter):
    path = adapter("llama", "all-r8", rank=8, alpha=24.0)
    with pytest.raises(ValueError, match="lora_int_id must be an integer >= 1"):
        LoRARequest("zero", 0, path)
    with pytest.raises(ValueError, match="lora_path is empty"):
        LoRARequest("nopath", 1)
    with pytest.raises(ValueError, match="got 1 lora_request entries for 2 prompts"):
        run(llm, [LoRARequest("a", 1, path)], prompts=([5], [6]))
    with pytest.raises(ValueError, match="lora_int_id 1 is already adapter 'a'"):
        run(llm, [LoRARequest("a", 1, path)])
        run(llm, [LoRARequest("other", 1, path + "-elsewhere")])
    plain = LLM(base("llama"), device="cpu", max_model_len=64)
    with pytest.raises(ValueError, match="LoRA is off: create the LLM with enable_lora=True"):
        run(plain, LoRARequest("a", 1, path))
    with pytest.raises(ValueError, match="pipeline_parallel_size > 1 is not supported yet"):
        LLM(base("llama"), device="cpu", enable_lora=True, pipeline_parallel_size=2)
    with pytest.raises(ValueError, match="max_cpu_loras=1 must be >= max_loras=2"):
        LLM(base("llama"), device="cpu", enable_lora=True, max_loras=2, max_cpu_loras=1)


def test_nothing_is_queued_by_a_bad_request_and_the_engine_goes_on(llm, base, adapter,
                                                                   oracle):
    good = LoRARequest("a", 1, adapter("llama", "all-r8", rank=8, alpha=24.0))
    bad = LoRARequest("big", 7, adapter("llama", "all-r16", rank=16))
    with pytest.raises(ValueError, match="prompt 1: "):
        run(llm, [good, bad], prompts=([5, 6, 7], [8, 9]))
    assert not llm.llm_engine.has_unfinished_requests()
    got = run(llm, good)[0].outputs[0].token_ids
    assert got == oracle("llama", good.lora_path, [[5, 6, 7]], 3)[0]


def test_pooling_refuses_adapters(llm, adapter):
    # (beam search takes them: tests/lora/test_lora_beam_search.py)
    lora = LoRARequest("a", 1, adapter("llama", "all-r8", rank=8, alpha=24.0))
    with pytest.raises(ValueError, match=r"embed\(\) does not take a lora_request yet"):
        llm.embed(["x"], lora_request=lora)
