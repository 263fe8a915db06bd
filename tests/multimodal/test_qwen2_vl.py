"""Qwen2-VL (issue 24): the vision transformer, the 2x2 patch merger and M-RoPE positions
give transformers' greedy tokens (fp32, CPU) with one and two images of different sizes per
prompt mixed with text rows, through chunked prefill, with images in prefix-cache hashes.

transformers 5's Qwen2VLProcessor needs torchvision for its video processor, which this CPU
environment lacks: the tests run the real processor class with the video attribute removed
(hpcinfer.testing.tiny_vision.qwen2_vl_image_processor), for both engines."""
from __future__ import annotations

import pytest
import torch

from hpcinfer import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
ONE = f"<|im_start|>user\n{IMAGE}What is in the picture?<|im_end|>\n<|im_start|>assistant\n"
TWO = (f"<|im_start|>user\n{IMAGE} and {IMAGE}Are they the same?<|im_end|>\n"
       "<|im_start|>assistant\n")
TEXT = "Hello, world! How are you today?"


@pytest.fixture(scope="module")
def qwen_dir():
    from hpcinfer.testing.tiny_vision import tiny_qwen2_vl
    return str(tiny_qwen2_vl())


@pytest.fixture(scope="module")
def processor(qwen_dir):
    from hpcinfer.testing.tiny_vision import qwen2_vl_image_processor
    return qwen2_vl_image_processor(qwen_dir)


@pytest.fixture(autouse=True)
def image_only_processor(monkeypatch, qwen_dir, processor):
    from hpcinfer.testing.tiny_vision import use_processor
    use_processor(monkeypatch, qwen_dir, processor)


@pytest.fixture(scope="module")
def hf_qwen(qwen_dir, processor):
    from transformers import Qwen2VLForConditionalGeneration
    model = Qwen2VLForConditionalGeneration.from_pretrained(qwen_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None

    def generate(text=None, images=None, messages=None):
        from hpcinfer.testing.tiny_vision import hf_generate
        return hf_generate(model, processor, text, images, messages)[0]
    return generate


def make_llm(path, **kwargs):
    return LLM(path, **{"device": "cpu", "dtype": "float32", "max_model_len": 256,
                        "max_num_seqs": 8, **kwargs})


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_mixed_batch_equals_transformers(qwen_dir, images, hf_qwen):
    # images of 40x40, 64x30, 25x50, 12x20 pixels: grids of 2x2 to 4x2 merged tokens
    prompts = [{"prompt": ONE, "multi_modal_data": {"image": images[0]}}, TEXT,
               {"prompt": TWO, "multi_modal_data": {"image": [images[1], images[2]]}},
               {"prompt": ONE, "multi_modal_data": {"image": [images[3]]}}]
    got = tokens(make_llm(qwen_dir).generate(prompts, GREEDY, use_tqdm=False))
    assert got == [hf_qwen(ONE, [images[0]]), hf_qwen(TEXT), hf_qwen(TWO, images[1:3]),
                   hf_qwen(ONE, [images[3]])]
    assert len(set(map(tuple, got))) == len(got)


def test_chunked_prefill_through_images(qwen_dir, images, hf_qwen):
    prompts = [{"prompt": TWO, "multi_modal_data": {"image": [images[1], images[0]]}},
               {"prompt": ONE, "multi_modal_data": {"image": images[2]}}, TEXT]
    llm = make_llm(qwen_dir, max_num_batched_tokens=5, enable_prefix_caching=False)
    got = tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    assert got == [hf_qwen(TWO, [images[1], images[0]]), hf_qwen(ONE, [images[2]]),
                   hf_qwen(TEXT)]


def test_decode_graphs_replay_after_image_prefills(qwen_dir, images, hf_qwen, monkeypatch):
    # Decode steps (and steps without image tokens) carry one row of M-RoPE positions, so
    # they replay the decode graphs and split mixed steps as text models do; steps holding
    # image tokens run eagerly. ReplayOnCpu stands in for the capture (tests/gpu has the
    # real graphs).
    from hpcinfer.engine import cuda_graphs
    from hpcinfer.testing.cpu_graphs import install_graphs
    monkeypatch.setattr(cuda_graphs, "MIN_SPLIT_DECODES", 1)
    prompts = [{"prompt": ONE, "multi_modal_data": {"image": images[0]}}, TEXT,
               {"prompt": TWO, "multi_modal_data": {"image": [images[1], images[2]]}},
               TEXT + " And tomorrow?"]
    llm = make_llm(qwen_dir, max_num_seqs=4, max_num_batched_tokens=16)
    graphs = install_graphs(llm)
    got = tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    assert got == [hf_qwen(ONE, [images[0]]), hf_qwen(TEXT), hf_qwen(TWO, images[1:3]),
                   hf_qwen(TEXT + " And tomorrow?")]
    assert graphs.num_replays > 0 and graphs.num_splits > 0


def test_different_images_never_share_kv(qwen_dir, images, hf_qwen):
    llm = make_llm(qwen_dir, block_size=4)
    bm = llm.llm_engine.block_manager
    first = tokens(llm.generate({"prompt": ONE, "multi_modal_data": {"image": images[0]}},
                                GREEDY, use_tqdm=False))
    hits = bm.prefix_cache_hits
    # same size, other pixels: same placeholder count, so only the image hash tells them apart
    other_image = images[0].transpose(0)  # mirrored
    other = tokens(llm.generate({"prompt": ONE, "multi_modal_data": {"image": other_image}},
                                GREEDY, use_tqdm=False))
    assert bm.prefix_cache_hits - hits <= 4  # "<|im_start|>user\n<|vision_start|>" only
    assert first != other
    assert first[0] == hf_qwen(ONE, [images[0]]) and other[0] == hf_qwen(ONE, [other_image])


def test_chat_image_parts(qwen_dir, images, hf_qwen):
    conversation = [{"role": "user", "content": [
        {"type": "image_pil", "image_pil": images[1]}, {"type": "text", "text": "Describe."}]}]
    out = make_llm(qwen_dir).chat(conversation, GREEDY, use_tqdm=False)
    expected = hf_qwen(messages=[{"role": "user", "content": [
        {"type": "image", "image": images[1]}, {"type": "text", "text": "Describe."}]}])
    assert out[0].outputs[0].token_ids == expected


def test_login_side_accepts_released_qwen2_vl_configs():
    # Qwen/Qwen2-VL-7B-Instruct's config.json (transformers 4 layout): rope type "mrope"
    from hpcinfer.compile.checkpoint import checkpoint_problem
    hub = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
           "hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4,
           "num_hidden_layers": 28, "rope_scaling": {"type": "mrope",
                                                     "mrope_section": [16, 24, 24]},
           "vision_config": {"depth": 32, "embed_dim": 1280}}
    assert checkpoint_problem(hub) is None
    assert checkpoint_problem({**hub, "rope_scaling": {"type": "su"}}) is not None


def test_without_torchvision_the_engine_takes_the_image_only_processor(qwen_dir, images,
                                                                       monkeypatch, hf_qwen):
    """transformers 5's Qwen2VLProcessor fails without torchvision (its video part): the
    engine then loads the image-only processor itself (multimodal/image_only.py) and answers
    as transformers does; with torchvision present the failure would be reported as is."""
    import importlib.util

    import transformers

    from hpcinfer.multimodal import image_only

    def broken(path, *args, **kwargs):  # what transformers 5 does without torchvision
        raise AttributeError("type object 'VIDEO_PROCESSOR_MAPPING' has no attribute "
                             "'_extra_content'")
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", broken)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchvision" else find_spec(name, *a))
    llm = make_llm(qwen_dir)
    processor = llm.llm_engine.multimodal.processor
    assert type(processor) is image_only.ImageOnlyQwen2VLProcessor
    out = llm.generate({"prompt": ONE, "multi_modal_data": {"image": images[1]}}, GREEDY,
                       use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_qwen(ONE, [images[1]])
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "torchvision" else find_spec(name, *a))
    with pytest.raises(ValueError, match="could not load the model's processor"):
        make_llm(qwen_dir)


def test_mm_processor_kwargs(qwen_dir, images, processor):
    # Per-prompt processor arguments (vLLM's mm_processor_kwargs): a larger pixel budget gives
    # a larger grid; the same image preprocessed otherwise never shares KV.
    from transformers import Qwen2VLForConditionalGeneration
    kwargs = {"min_pixels": 28 * 28 * 8, "max_pixels": 28 * 28 * 12}
    model = Qwen2VLForConditionalGeneration.from_pretrained(qwen_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    inputs = processor(text=[ONE], images=[images[1]], return_tensors="pt", **kwargs)
    with torch.no_grad():
        expected = model.eval().generate(**inputs, max_new_tokens=12, do_sample=False)
    expected = expected[0, inputs["input_ids"].shape[1]:].tolist()
    llm = make_llm(qwen_dir, block_size=4)
    plain = {"prompt": ONE, "multi_modal_data": {"image": images[1]}}
    out = llm.generate([{**plain, "mm_processor_kwargs": kwargs}], GREEDY, use_tqdm=False)
    assert out[0].outputs[0].token_ids == expected
    assert len(out[0].prompt_token_ids) == inputs["input_ids"].shape[1]
    bm = llm.llm_engine.block_manager
    llm.generate(plain, GREEDY, use_tqdm=False)
    hits = bm.prefix_cache_hits
    llm.generate({**plain, "mm_processor_kwargs": {"do_normalize": False}}, GREEDY,
                 use_tqdm=False)  # same grid, other pixels: only the text before the image
    assert bm.prefix_cache_hits - hits <= 4
    with pytest.raises(ValueError, match="mm_processor_kwargs must be a dict"):
        llm.generate({**plain, "mm_processor_kwargs": "max_pixels=5"}, GREEDY)


def test_many_image_prompts_are_preprocessed_on_threads(qwen_dir, images, monkeypatch):
    """LLM.generate preprocesses >= MIN_PROMPTS_FOR_THREADS image prompts on a thread pool
    (each thread its own processor copy): the same tokens as one thread, errors still name
    the first bad prompt."""
    import threading

    from hpcinfer.engine import llm as llm_module
    from hpcinfer.multimodal.processor import MultiModalProcessor
    monkeypatch.setattr(llm_module.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    prompts = [{"prompt": ONE, "multi_modal_data": {"image": images[i % 4]}} if i % 5 else
               {"prompt": TWO, "multi_modal_data": {"image": [images[i % 4], images[3]]}}
               for i in range(llm_module.MIN_PROMPTS_FOR_THREADS + 2)]
    llm = make_llm(qwen_dir)
    seen = set()
    here = MultiModalProcessor._processor_here

    def spy(self):
        seen.add(threading.current_thread().name.split("_")[0])
        return here(self)
    monkeypatch.setattr(MultiModalProcessor, "_processor_here", spy)
    threaded = tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    assert seen == {"hpcinfer-process"}
    monkeypatch.setattr(llm_module, "MIN_PROMPTS_FOR_THREADS", 10 ** 6)
    seen.clear()
    assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == threaded
    assert seen == {"MainThread"}
    monkeypatch.setattr(llm_module, "MIN_PROMPTS_FOR_THREADS", 2)
    bad = list(prompts)
    bad[7] = {"prompt": ONE, "multi_modal_data": {"image": [images[0], images[1]]}}
    bad[11] = {"prompt": 3}
    with pytest.raises(ValueError, match=r"^prompt 7: "):
        llm.generate(bad, GREEDY, use_tqdm=False)
