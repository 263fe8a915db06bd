"""LLaVA (issue 24): greedy tokens equal to transformers (fp32, CPU) with one and two images
per prompt mixed with text-only rows, images in prefix-cache hashes, chunked prefill through
placeholder spans, chat image parts, and one clear ValueError per bad request."""
from __future__ import annotations

import base64
import io

import pytest

from hpcinfer import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
ONE = "USER: <image>\nWhat is in the picture? ASSISTANT:"
TWO = "USER: <image> and <image>\nAre they the same? ASSISTANT:"
TEXT = "Hello, world! How are you today?"


def make_llm(path, **kwargs):
    kwargs = {"device": "cpu", "dtype": "float32", "max_model_len": 256, "max_num_seqs": 8,
              **kwargs}
    return LLM(path, **kwargs)


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def counting_encoder(llm):
    """Wrap the model's encode_images; returns the list of per-call image counts."""
    model, calls = llm.llm_engine.runner.model, []
    encode = model.encode_images

    def counted(inputs):
        calls.append(len(inputs))
        return encode(inputs)
    model.encode_images = counted
    return calls


def test_mixed_batch_equals_transformers(llava_dir, images, hf_llava):
    prompts = [{"prompt": ONE, "multi_modal_data": {"image": images[0]}},
               TEXT,
               {"prompt": TWO, "multi_modal_data": {"image": [images[1], images[2]]}},
               {"prompt": ONE, "multi_modal_data": {"image": [images[3]]}},
               "The quick brown fox"]
    llm = make_llm(llava_dir)
    calls = counting_encoder(llm)
    got = tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    expected = [hf_llava(llava_dir, ONE, [images[0]])[0], hf_llava(llava_dir, TEXT)[0],
                hf_llava(llava_dir, TWO, images[1:3])[0], hf_llava(llava_dir, ONE, [images[3]])[0],
                hf_llava(llava_dir, "The quick brown fox")[0]]
    assert got == expected
    assert sum(calls) == 4  # each image encoded once, all in the first step here
    assert len(set(map(tuple, got))) == len(got)


def test_feature_layer_list_and_full_strategy(images, hf_llava):
    from hpcinfer.testing.tiny_vision import tiny_llava
    path = str(tiny_llava("full", (-3, -1)))  # 17 tokens per image, two layers concatenated
    llm = make_llm(path)
    prompts = [{"prompt": TWO, "multi_modal_data": {"image": images[2:4]}}, TEXT]
    got = tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    assert got == [hf_llava(path, TWO, images[2:4])[0], hf_llava(path, TEXT)[0]]


@pytest.mark.parametrize("strategy", ["full", "default"])
def test_siglip_tower_and_mistral_text(images, hf_llava, strategy):
    # SigLIP: no CLS ("default" drops the first patch, as transformers does), bias in the
    # patch embedding, an unused pooling head in the checkpoint; Mistral: a 24-token window.
    from hpcinfer.testing.tiny_vision import tiny_llava
    path = str(tiny_llava(strategy, -1, vision="siglip", text="mistral"))
    llm = make_llm(path)
    prompts = [{"prompt": TWO, "multi_modal_data": {"image": images[:2]}}, TEXT,
               {"prompt": ONE, "multi_modal_data": {"image": images[3]}}]
    got = tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    assert got == [hf_llava(path, TWO, images[:2])[0], hf_llava(path, TEXT)[0],
                   hf_llava(path, ONE, images[3:])[0]]


def test_chunked_prefill_cuts_through_images(llava_dir, images, hf_llava):
    # 5-token steps: every 16-token placeholder span is split over 4-5 chunks, and
    # several sequences share each step's budget.
    prompts = [{"prompt": TWO, "multi_modal_data": {"image": [images[0], images[3]]}},
               {"prompt": ONE, "multi_modal_data": {"image": images[1]}}, TEXT]
    llm = make_llm(llava_dir, max_num_batched_tokens=5, enable_prefix_caching=False)
    calls = counting_encoder(llm)
    got = tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    assert got == [hf_llava(llava_dir, TWO, [images[0], images[3]])[0],
                   hf_llava(llava_dir, ONE, [images[1]])[0], hf_llava(llava_dir, TEXT)[0]]
    assert sum(calls) == 3  # once per image, however many chunks its span took
    assert len(calls) > 1   # (and not all in one step: the chunks reached them one by one)


def test_different_images_never_share_kv(llava_dir, images, hf_llava):
    llm = make_llm(llava_dir, block_size=4)
    bm = llm.llm_engine.block_manager
    first = {"prompt": ONE, "multi_modal_data": {"image": images[0]}}
    other = {"prompt": ONE, "multi_modal_data": {"image": images[1]}}
    num_text_before = 7  # BOS "USER: " before the placeholders: one full 4-token block
    out_first = tokens(llm.generate(first, GREEDY, use_tqdm=False))
    hits = bm.prefix_cache_hits
    out_other = tokens(llm.generate(other, GREEDY, use_tqdm=False))
    assert bm.prefix_cache_hits - hits == 4 * (num_text_before // 4)  # the text only
    assert out_first != out_other
    assert out_first[0] == hf_llava(llava_dir, ONE, [images[0]])[0]
    assert out_other[0] == hf_llava(llava_dir, ONE, [images[1]])[0]
    hits = bm.prefix_cache_hits
    again = tokens(llm.generate(first, GREEDY, use_tqdm=False))  # the same image: shared
    assert bm.prefix_cache_hits - hits > 16
    assert again == out_first


def test_same_prompt_different_images_in_one_batch(llava_dir, images, hf_llava):
    llm = make_llm(llava_dir, block_size=4)
    prompts = [{"prompt": TWO, "multi_modal_data": {"image": [images[0], images[1]]}},
               {"prompt": TWO, "multi_modal_data": {"image": [images[0], images[2]]}}]
    got = tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    assert got[0] != got[1]
    assert got == [hf_llava(llava_dir, TWO, images[0:2])[0],
                   hf_llava(llava_dir, TWO, [images[0], images[2]])[0]]


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_chat_image_parts(llava_dir, images, hf_llava, tmp_path):
    path = tmp_path / "cat.png"
    images[2].save(path)
    conversation = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url(images[0])}},
        {"type": "text", "text": "Compare with"},
        {"type": "image_url", "image_url": {"url": f"file://{path}"}},
        {"type": "image_pil", "image_pil": images[3]}]}]
    hf_messages = [{"role": "user", "content": [
        {"type": "image", "image": images[0]}, {"type": "text", "text": "Compare with"},
        {"type": "image", "image": images[2]}, {"type": "image", "image": images[3]}]}]
    llm = make_llm(llava_dir, allowed_local_media_path=str(tmp_path))
    out = llm.chat([conversation, [{"role": "user", "content": "Hello there"}]], GREEDY,
                   use_tqdm=False)
    expected, expected_prompt = hf_llava(llava_dir, messages=hf_messages)
    assert out[0].prompt_token_ids == expected_prompt
    assert out[0].outputs[0].token_ids == expected
    text_expected, _ = hf_llava(llava_dir, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Hello there"}]}])
    assert out[1].outputs[0].token_ids == text_expected


@pytest.mark.parametrize("prompt, message", [
    ("USER: <image>\nhi ASSISTANT:", "image placeholder tokens .* but no images"),
    ({"prompt": TWO, "multi_modal_data": {"image": ["not an image"]}}, "not a PIL.Image"),
    ({"prompt": "USER: hi", "multi_modal_data": {"video": []}}, "only images are supported"),
    ({"prompt_token_ids": [2, 5], "multi_modal_data": {"image": []}}, "prompt_token_ids with"),
])
def test_bad_generate_inputs(llava_dir, prompt, message):
    llm = _shared_llm(llava_dir)
    with pytest.raises(ValueError, match=message):
        llm.generate(prompt, GREEDY, use_tqdm=False)


def test_wrong_image_count(llava_dir, images):
    llm = _shared_llm(llava_dir)
    with pytest.raises(ValueError, match="prompt 1: .*image"):
        llm.generate(["fine", {"prompt": TWO, "multi_modal_data": {"image": images[0]}}],
                     GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()  # nothing was queued
    one = {"prompt": ONE, "multi_modal_data": {"image": images[:2]}}
    with pytest.raises(ValueError, match="image"):
        llm.generate(one, GREEDY, use_tqdm=False)


@pytest.mark.parametrize("url, message", [
    ("https://example.com/cat.png", "network URL"),
    ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "not a readable image"),
    ("data:text/plain;base64,aGk=", "data URL must look like"),
    ("file:///no/such/file.png", "without allowed_local_media_path"),  # unset: vLLM's refusal
    ("/no/such/file.png", "without allowed_local_media_path"),
])
def test_bad_chat_images(llava_dir, url, message):
    llm = _shared_llm(llava_dir)
    conversation = [{"role": "user", "content": [
        {"type": "text", "text": "What is it?"},
        {"type": "image_url", "image_url": {"url": url}}]}]
    with pytest.raises(ValueError, match=f"conversation 0, message 0, part 1: .*{message}"):
        llm.chat(conversation, GREEDY, use_tqdm=False)
    out = llm.generate(TEXT, SamplingParams(max_tokens=2), use_tqdm=False)  # still serving
    assert len(out[0].outputs[0].token_ids) == 2


def test_text_model_refuses_images(images):
    from hpcinfer.testing.tiny import tiny_checkpoint
    llm = make_llm(str(tiny_checkpoint("llama")))
    with pytest.raises(ValueError, match="LlamaForCausalLM takes no images"):
        llm.generate({"prompt": ONE, "multi_modal_data": {"image": images[0]}}, GREEDY)


_LLMS: dict = {}


def _shared_llm(path):
    if path not in _LLMS:
        _LLMS[path] = make_llm(path)
    return _LLMS[path]


def test_preemption_and_samples_reencode(llava_dir, images, hf_llava):
    # A pool of 28 blocks of 4 tokens holds two 51-token prompts but not their 12 new tokens:
    # some are preempted (recompute) and encode their images again; n=2 samples share them.
    prompts = [{"prompt": ONE, "multi_modal_data": {"image": images[i]}} for i in range(3)]
    llm = make_llm(llava_dir, block_size=4, num_gpu_blocks_override=28, max_model_len=64,
                   enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, n=2)
    out = llm.generate(prompts, params, use_tqdm=False)
    assert llm.llm_engine.num_preemptions > 0
    for i, request in enumerate(out):
        expected = hf_llava(llava_dir, ONE, [images[i]])[0]
        assert [c.token_ids for c in request.outputs] == [expected, expected]


def test_encoder_budget_per_step(llava_dir, images, hf_llava):
    # Prompts that open with their images, 24-token steps: without the budget, one step's
    # chunks reach 2-3 fresh 16-token images. With it, a step encodes at most 24 image tokens
    # (or one image, however large), and the tokens stay transformers'.
    lead = "<image><image>\nUSER: Which is brighter? ASSISTANT:"
    prompts = [{"prompt": lead, "multi_modal_data": {"image": [images[i], images[i + 1]]}}
               for i in range(3)]
    llm = make_llm(llava_dir, max_num_batched_tokens=24, enable_prefix_caching=False)
    calls = counting_encoder(llm)
    got = tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    assert got == [hf_llava(llava_dir, lead, [images[i], images[i + 1]])[0] for i in range(3)]
    assert sum(calls) == 6 and max(calls) == 1  # 16 tokens each: one image per step


def test_beam_search_refuses_images_clearly(llava_dir, images):
    from hpcinfer.sampling_params import BeamSearchParams
    llm = _shared_llm(llava_dir)
    with pytest.raises(ValueError, match="images .* go through generate\\(\\) and chat\\(\\)"):
        llm.beam_search([{"prompt": ONE, "multi_modal_data": {"image": images[0]}}],
                        BeamSearchParams(beam_width=2, max_tokens=4))


def test_async_llm_streams_with_images(llava_dir, images, hf_llava):
    import asyncio

    from hpcinfer.engine.async_llm import AsyncLLM
    from hpcinfer.engine.arg_utils import AsyncEngineArgs
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=llava_dir, device="cpu", dtype="float32", max_model_len=256))

    async def run():
        final = None
        prompt = {"prompt": ONE, "multi_modal_data": {"image": images[2]}}
        async for out in engine.generate(prompt, GREEDY, request_id="img-0"):
            final = out
        return final.outputs[0].token_ids
    try:
        assert asyncio.run(run()) == hf_llava(llava_dir, ONE, [images[2]])[0]
    finally:
        engine.shutdown()



def test_prefix_hit_ending_inside_an_image(llava_dir, images, hf_llava):
    # The prompt ends with its image: a repeat takes all but the last block from the cache,
    # so its first chunk starts inside the placeholder span; the image is encoded again and
    # only its last rows are used.
    tail = "USER: <image>"
    llm = make_llm(llava_dir, block_size=4)
    calls = counting_encoder(llm)
    prompt = {"prompt": tail, "multi_modal_data": {"image": images[1]}}
    first = tokens(llm.generate(prompt, GREEDY, use_tqdm=False))
    hits = llm.llm_engine.block_manager.prefix_cache_hits
    again = tokens(llm.generate(prompt, GREEDY, use_tqdm=False))
    num_prompt = 1 + 4 + 16  # BOS, "USER: " (4 tokens here), 16 image tokens
    assert llm.llm_engine.block_manager.prefix_cache_hits - hits == 4 * ((num_prompt - 1) // 4)
    assert calls == [1, 1]
    assert first == again == [hf_llava(llava_dir, tail, [images[1]])[0]]
