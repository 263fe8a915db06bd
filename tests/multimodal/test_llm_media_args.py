"""LLM(limit_mm_per_prompt=..., allowed_local_media_path=...) as vLLM's (issue 24), on the tiny
LLaVA: each refused request is one ValueError naming the argument and nothing is queued;
prompts within the limits give transformers' tokens as without the arguments."""
from __future__ import annotations

import os

import pytest

from hpcinfer import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
ONE = "USER: <image>\nWhat is in the picture? ASSISTANT:"
TWO = "USER: <image> and <image>\nAre they the same? ASSISTANT:"


@pytest.fixture(scope="module")
def media(tmp_path_factory, images):
    """media/ (allowed) holding cat.png, a link to ../outside.png, and outside.png beside it."""
    root = tmp_path_factory.mktemp("media_args")
    (root / "media").mkdir()
    images[0].save(root / "media" / "cat.png")
    images[1].save(root / "outside.png")
    os.symlink(root / "outside.png", root / "media" / "link.png")
    return root


@pytest.fixture(scope="module")
def limited(llava_dir, media):
    return LLM(llava_dir, device="cpu", dtype="float32", max_model_len=256, max_num_seqs=8,
               limit_mm_per_prompt={"image": 1},
               allowed_local_media_path=str(media / "media"))


def _chat(*urls):
    return [{"role": "user", "content": [
        {"type": "text", "text": "What is it?"},
        *({"type": "image_url", "image_url": {"url": url}} for url in urls)]}]


def test_within_limits_unchanged(limited, llava_dir, images, media, hf_llava):
    out = limited.generate([{"prompt": ONE, "multi_modal_data": {"image": images[0]}}, "hi"],
                           GREEDY, use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_llava(llava_dir, ONE, [images[0]], max_new=6)[0]
    assert out[1].outputs[0].token_ids == hf_llava(llava_dir, "hi", max_new=6)[0]
    chat = limited.chat(_chat(f"file://{media}/media/cat.png"), GREEDY, use_tqdm=False)
    hf_messages = [{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                                {"type": "image", "image": images[0]}]}]
    assert chat[0].outputs[0].token_ids == hf_llava(llava_dir, messages=hf_messages,
                                                    max_new=6)[0]


def test_too_many_images(limited, images):
    with pytest.raises(ValueError, match="prompt 1: request '1' has 2 images but "
                                         "limit_mm_per_prompt allows 1 per prompt"):
        limited.generate(["fine", {"prompt": TWO, "multi_modal_data": {"image": images[:2]}}],
                         GREEDY, use_tqdm=False)
    assert not limited.llm_engine.has_unfinished_requests()  # nothing was queued
    data_url_free = [{"role": "user", "content": [
        {"type": "image_pil", "image_pil": images[0]},
        {"type": "image_url", "image_url": {"url": "file:///never/read.png"}}]}]
    with pytest.raises(ValueError, match="conversation 1 has 2 images but limit_mm_per_prompt "
                                         "allows 1"):
        limited.chat([_chat(), data_url_free], GREEDY, use_tqdm=False)
    assert not limited.llm_engine.has_unfinished_requests()


@pytest.mark.parametrize("url, message", [
    ("file://{root}/outside.png", r"outside\.png is outside allowed_local_media_path"),
    ("{root}/outside.png", r"outside\.png is outside allowed_local_media_path"),
    ("file://{root}/media/../outside.png", r"resolves to .*outside\.png\) is outside "
                                           "allowed_local_media_path"),
    ("file://{root}/media/link.png", r"link\.png \(resolves to .*outside\.png\) is outside "
                                     "allowed_local_media_path"),
])
def test_local_files_outside_refused(limited, media, url, message):
    with pytest.raises(ValueError, match="conversation 1, message 0, part 1: .*" + message):
        limited.chat([_chat(), _chat(url.format(root=media))], GREEDY, use_tqdm=False)
    assert not limited.llm_engine.has_unfinished_requests()


def test_bad_arguments_refused_before_loading(llava_dir, tmp_path):
    with pytest.raises(ValueError, match="allowed_local_media_path=.* does not exist"):
        LLM(llava_dir, device="cpu", allowed_local_media_path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="limit_mm_per_prompt"):
        LLM(llava_dir, device="cpu", limit_mm_per_prompt={"image": "two"})
