"""LLM.generate runs the engine while many image prompts are still being preprocessed
(engine/llm.py _ImagePromptStream): requests are added in prompt order as their processing
ends, the tokens are those of a run without threads, and a bad prompt raises the error of the
first bad prompt in order, with everything added so far aborted."""
from __future__ import annotations

import threading

import pytest

from hpcinfer import LLM, SamplingParams
from hpcinfer.engine import llm as llm_module
from hpcinfer.multimodal.processor import MultiModalProcessor

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


@pytest.fixture
def llm(llava_dir, monkeypatch):
    monkeypatch.setattr(llm_module.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    return LLM(llava_dir, device="cpu", dtype="float32", max_model_len=256, max_num_seqs=8)


def _prompts(images, n):
    return [{"prompt": PROMPT, "multi_modal_data": {"image": images[i % len(images)]}}
            for i in range(n)]


def test_engine_steps_before_the_last_prompt_is_processed(llm, images, monkeypatch):
    n = llm_module.MIN_PROMPTS_FOR_THREADS + 4
    prompts = _prompts(images, n)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    stepped = threading.Event()
    engine = llm.llm_engine
    step = engine.step

    def spy_step(*args, **kwargs):
        stepped.set()
        return step(*args, **kwargs)
    monkeypatch.setattr(engine, "step", spy_step)
    process = MultiModalProcessor.process
    waited = []

    def slow_last(self, prompt, request_id):
        if request_id == str(n - 1):   # the last prompt waits for the engine's first step
            waited.append(stepped.wait(timeout=30))
        return process(self, prompt, request_id)
    monkeypatch.setattr(MultiModalProcessor, "process", slow_last)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert waited == [True], "the engine did not step before preprocessing ended"
    assert got == expected


def test_first_bad_prompt_in_order_aborts_what_was_added(llm, images):
    prompts = _prompts(images, llm_module.MIN_PROMPTS_FOR_THREADS + 4)
    prompts[9] = {"prompt": PROMPT, "multi_modal_data": {"image": [images[0], images[1]]}}
    prompts[14] = {"prompt": PROMPT, "multi_modal_data": {"image": "not an image"}}
    with pytest.raises(ValueError, match=r"^prompt 9: "):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    out = llm.generate(_prompts(images, 2), GREEDY, use_tqdm=False)   # still usable
    assert [len(o.outputs[0].token_ids) for o in out] == [6, 6]
