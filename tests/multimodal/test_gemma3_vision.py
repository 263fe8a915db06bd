"""Gemma 3 with images (issue 24): greedy tokens equal to transformers (fp32, CPU) with one and
several images per prompt mixed with text rows, prefix caching on, chunked prefill that keeps
each image's span whole, chat image parts, and the other checkpoint layouts.

The mask is the point: Gemma 3's image tokens attend to their whole image both ways. The
tiny checkpoint is sensitive to it (``test_the_mask_decides_the_tokens``: transformers without
``token_type_ids``, i.e. causal, answers differently, and so do we with the spans off), so the
equality tests below fail if our mask is wrong.
"""
from __future__ import annotations

import base64
import io
import json
import shutil

import pytest
import torch

from hpcinfer import LLM, SamplingParams
from hpcinfer.testing.schedule_log import record_chunks
from hpcinfer.testing.tiny_vision import GEMMA3_IMAGE_TOKENS, hf_generate

MAX_NEW = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
ONE = "<start_of_turn>user\n<start_of_image>Describe it.<end_of_turn>\n<start_of_turn>model\n"
TWO = ("<start_of_turn>user\n<start_of_image> and <start_of_image> Same?<end_of_turn>\n"
       "<start_of_turn>model\n")
LEAD = "<start_of_image>What is it?"   # the image right after BOS
TEXT = "Hello, world! How are you today?"


@pytest.fixture(scope="session")
def gemma3_dir():
    from hpcinfer.testing.tiny_vision import tiny_gemma3
    return str(tiny_gemma3())


@pytest.fixture(scope="session")
def hf_gemma3(gemma3_dir):
    """hf_gemma3(text, images | messages=, causal=False) -> (transformers' greedy tokens, the
    prompt's ids). ``causal=True`` drops token_type_ids: transformers' mask without images'
    bidirectional spans."""
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration
    processor = AutoProcessor.from_pretrained(gemma3_dir)
    model = Gemma3ForConditionalGeneration.from_pretrained(gemma3_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.eval()
    results = {}

    def generate(text=None, images=None, messages=None, causal=False):
        if causal:
            inputs = processor(text=[text], images=images, return_tensors="pt")
            inputs.pop("token_type_ids")
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
            return out[0, inputs["input_ids"].shape[1]:].tolist(), None
        key = (text, tuple(id(i) for i in images or ()), repr(messages))
        if key not in results:
            results[key] = hf_generate(model, processor, text, images, messages, MAX_NEW)
        return results[key]
    return generate


def make_llm(path, **kwargs):
    return LLM(path, **{"device": "cpu", "dtype": "float32", "max_model_len": 256,
                        "max_num_seqs": 8, **kwargs})


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def assert_no_chunk_ends_inside_a_span(chunks):
    for seq, start, num_new in chunks:
        for item in (seq.mm_inputs.items if seq.mm_inputs is not None else []):
            assert not item.offset < start + num_new < item.end, (start, num_new, item)


def counting_encoder(llm):
    model, calls = llm.llm_engine.runner.model, []
    encode = model.encode_images

    def counted(inputs):
        calls.append(len(inputs))
        return encode(inputs)
    model.encode_images = counted
    return calls


def _prompts(images):
    return [{"prompt": ONE, "multi_modal_data": {"image": images[0]}},
            TEXT,
            {"prompt": TWO, "multi_modal_data": {"image": [images[1], images[2]]}},
            {"prompt": LEAD, "multi_modal_data": {"image": [images[3]]}}]


def _expected(hf_gemma3, images):
    return [hf_gemma3(ONE, [images[0]])[0], hf_gemma3(TEXT)[0],
            hf_gemma3(TWO, images[1:3])[0], hf_gemma3(LEAD, [images[3]])[0]]


def test_the_mask_decides_the_tokens(gemma3_dir, images, hf_gemma3):
    # Without the bidirectional spans transformers answers otherwise on this checkpoint, and
    # our engine with them switched off answers as transformers' causal mask does.
    prompts = _prompts(images)
    causal = [hf_gemma3(p["prompt"], p["multi_modal_data"]["image"], causal=True)[0]
              if isinstance(p, dict) else hf_gemma3(p)[0] for p in prompts]
    assert causal != _expected(hf_gemma3, images)
    llm = make_llm(gemma3_dir)
    llm.llm_engine.runner.spans_see_ahead = False   # no per-query limits: plain causal
    assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == causal


def test_mixed_batch_equals_transformers(gemma3_dir, images, hf_gemma3):
    llm = make_llm(gemma3_dir)
    calls = counting_encoder(llm)
    got = tokens(llm.generate(_prompts(images), GREEDY, use_tqdm=False))
    assert got == _expected(hf_gemma3, images)
    assert sum(calls) == 4
    assert len(set(map(tuple, got))) == len(got)
    # The processor's expansion: 16 soft tokens between <start_of_image> and <end_of_image>.
    out = llm.generate(_prompts(images)[:1], SamplingParams(max_tokens=1), use_tqdm=False)
    assert out[0].prompt_token_ids == hf_gemma3(ONE, [images[0]])[1]
    assert llm.llm_engine.runner.model.image_token_counts([{}]) == [GEMMA3_IMAGE_TOKENS]


@pytest.mark.parametrize("budget", [20, 7])
def test_chunked_prefill_keeps_spans_whole(gemma3_dir, images, hf_gemma3, budget):
    # 20-token steps: prompts are cut into chunks, each ending before a span that does not
    # fit. 7-token steps (less than one 16-token span): a span runs whole in a step of its
    # own over the budget. Either way no chunk ends inside a span and the tokens stay
    # transformers'.
    llm = make_llm(gemma3_dir, max_num_batched_tokens=budget, enable_prefix_caching=False)
    chunks, calls = record_chunks(llm), counting_encoder(llm)
    got = tokens(llm.generate(_prompts(images), GREEDY, use_tqdm=False))
    assert got == _expected(hf_gemma3, images)
    assert_no_chunk_ends_inside_a_span(chunks)
    assert sum(calls) == 4
    prefills = [n for seq, start, n in chunks if start < seq.num_prompt_tokens]
    assert len(prefills) > 8 and min(prefills) < GEMMA3_IMAGE_TOKENS   # really chunked
    if budget < GEMMA3_IMAGE_TOKENS:
        assert max(prefills) > budget   # the span's step went over the budget


def test_prefix_hits_inside_spans_reuse_identical_kv(gemma3_dir, images, hf_gemma3):
    # Block size 4: the repeat of a prompt hits the cache up to its last full block before
    # the prompt's last token. Here (BOS, "A", "\n\n<start_of_image>", 16 image tokens at
    # 5..20, "<end_of_image>\n\n": 24 tokens) that is token 20, inside the span; the rest
    # of the span is computed in one step, seeing the cached keys of the span's start
    # (equal: block hashes include the image). A different image shares only the blocks
    # before it.
    tail = "A<start_of_image>"
    llm = make_llm(gemma3_dir, block_size=4)
    bm, chunks = llm.llm_engine.block_manager, record_chunks(llm)
    first = {"prompt": tail, "multi_modal_data": {"image": images[1]}}
    out_first = tokens(llm.generate(first, GREEDY, use_tqdm=False))
    hits = bm.prefix_cache_hits
    again = tokens(llm.generate(first, GREEDY, use_tqdm=False))
    assert bm.prefix_cache_hits - hits >= 8
    second_start = chunks[-MAX_NEW][1]   # where the repeat's prefill began
    item = chunks[-MAX_NEW][0].mm_inputs.items[0]
    assert item.offset < second_start < item.end   # the hit ended inside the span
    other = tokens(llm.generate({"prompt": tail, "multi_modal_data": {"image": images[2]}},
                                GREEDY, use_tqdm=False))
    assert out_first == again == [hf_gemma3(tail, [images[1]])[0]]
    assert other == [hf_gemma3(tail, [images[2]])[0]] != out_first
    assert_no_chunk_ends_inside_a_span(chunks)


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_chat_image_parts(gemma3_dir, images, hf_gemma3):
    conversation = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url(images[0])}},
        {"type": "text", "text": "Compare with"},
        {"type": "image_pil", "image_pil": images[2]}]}]
    hf_messages = [{"role": "user", "content": [
        {"type": "image", "image": images[0]}, {"type": "text", "text": "Compare with"},
        {"type": "image", "image": images[2]}]}]
    llm = make_llm(gemma3_dir, max_num_batched_tokens=24)
    chunks = record_chunks(llm)
    out = llm.chat([conversation, [{"role": "user", "content": "Hello there"}]], GREEDY,
                   use_tqdm=False)
    expected, expected_prompt = hf_gemma3(messages=hf_messages)
    assert out[0].prompt_token_ids == expected_prompt
    assert out[0].outputs[0].token_ids == expected
    text_expected, _ = hf_gemma3(messages=[{"role": "user", "content": [
        {"type": "text", "text": "Hello there"}]}])
    assert out[1].outputs[0].token_ids == text_expected
    assert_no_chunk_ends_inside_a_span(chunks)


@pytest.mark.parametrize("layout", ["google", "transformers5_in_memory"])
def test_checkpoint_layouts_load(gemma3_dir, images, hf_gemma3, tmp_path, layout):
    # Google's releases: vision_tower.vision_model.*; transformers 5 in memory: model.* and
    # an explicit (tied) lm_head.weight. Ours saved: language_model.model.*, vision_tower.*.
    from safetensors.torch import load_file, save_file
    path = tmp_path / layout
    shutil.copytree(gemma3_dir, path)
    tensors = load_file(path / "model.safetensors")
    renamed = {}
    for name, tensor in tensors.items():
        if layout == "google":
            name = name.replace("vision_tower.", "vision_tower.vision_model.", 1)
        else:
            name = ("model." + name.replace("language_model.model.", "language_model.", 1))
        renamed[name] = tensor
    if layout != "google":
        renamed["lm_head.weight"] = tensors["language_model.model.embed_tokens.weight"].clone()
    save_file(renamed, path / "model.safetensors", metadata={"format": "pt"})
    llm = make_llm(str(path))
    got = tokens(llm.generate(_prompts(images)[2:], GREEDY, use_tqdm=False))
    assert got == _expected(hf_gemma3, images)[2:]


PAN_AND_SCAN = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 8}


def test_pan_and_scan_crops_equal_transformers(gemma3_dir, images, hf_gemma3):
    """do_pan_and_scan: the processor adds each wide or tall image's crops after it, each an
    image of its own (per request, or LLM(mm_processor_kwargs=...) for all); greedy tokens
    equal transformers' on the same processor output."""
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration
    processor = AutoProcessor.from_pretrained(gemma3_dir)
    model = Gemma3ForConditionalGeneration.from_pretrained(gemma3_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    want = []
    for text, imgs in ((ONE, [images[1]]), (TWO, [images[1], images[2]])):   # wide, tall
        inputs = processor(text=[text], images=imgs, return_tensors="pt", **PAN_AND_SCAN)
        assert inputs["pixel_values"].shape[0] > len(imgs)    # crops were made
        with torch.no_grad():
            out = model.eval().generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
        want.append((out[0, inputs["input_ids"].shape[1]:].tolist(),
                     inputs["input_ids"][0].tolist()))
    per_request = make_llm(gemma3_dir, max_model_len=512).generate(
        [{"prompt": ONE, "multi_modal_data": {"image": images[1]},
          "mm_processor_kwargs": PAN_AND_SCAN},
         {"prompt": TWO, "multi_modal_data": {"image": images[1:3]},
          "mm_processor_kwargs": PAN_AND_SCAN}], GREEDY, use_tqdm=False)
    engine_wide = make_llm(gemma3_dir, max_model_len=512,
                           mm_processor_kwargs=PAN_AND_SCAN).generate(
        [{"prompt": ONE, "multi_modal_data": {"image": images[1]}},
         {"prompt": TWO, "multi_modal_data": {"image": images[1:3]}}], GREEDY, use_tqdm=False)
    for outs in (per_request, engine_wide):
        assert [(o.outputs[0].token_ids, o.prompt_token_ids) for o in outs] == want


def test_placeholder_without_an_image_is_refused(gemma3_dir):
    # Gemma 3's placeholder is <start_of_image> (expanded only with an image): a text prompt
    # holding it would run without its image, so it is refused as LLaVA's <image> is.
    llm = make_llm(gemma3_dir)
    with pytest.raises(ValueError, match="'<start_of_image>'.* but no images"):
        llm.generate([TEXT, ONE], GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_login_side_accepts_the_checkpoint(gemma3_dir):
    # What `hpcinfer validate` runs on the login node (no torch import there: tests/login).
    from hpcinfer.compile.checkpoint import checkpoint_problem
    from hpcinfer.models import support
    hf = json.loads((__import__("pathlib").Path(gemma3_dir) / "config.json").read_text())
    assert hf["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert support.known_architecture("Gemma3ForConditionalGeneration")
    assert checkpoint_problem(hf) is None


def test_projector_hands_the_norm_a_contiguous_input(gemma3_dir, images, monkeypatch):
    """One image: the pooled patch grid was a transposed view whose last dim had stride 16;
    the CPU reference took it, the Triton norm refused it on the GPU (KernelArgumentError)."""
    from hpcinfer.kernels.launch_checks import check_last_dim_contiguous
    from hpcinfer.layers import ops
    rms_norm = ops.rms_norm

    def checked(x, *args, **kwargs):
        check_last_dim_contiguous("x", x)
        return rms_norm(x, *args, **kwargs)

    llm = make_llm(gemma3_dir)
    projector = llm.llm_engine.runner.model.multi_modal_projector
    monkeypatch.setattr(ops, "rms_norm", checked)
    tokens = projector.patches_per_side ** 2
    for n in (1, 3):
        features = torch.randn(n, tokens, projector.mm_soft_emb_norm.weight.shape[0])
        assert projector(features).shape[:2] == (n, llm.llm_engine.runner.model.config
                                                  .mm_tokens_per_image)
