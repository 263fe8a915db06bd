"""SamplingParams(prompt_logprobs=k): equal to transformers' log-softmax of the same logits
(fp32, CPU) with and without prefix-cache hits, chunked prefill, preemption, n > 1, and in
batches with requests that do not ask."""
from __future__ import annotations

import pytest
import torch

from hpcinfer import LLM, SamplingParams
from hpcinfer.engine.params import RequestOutputKind

FAMILY = "llama"
TOL = 1e-5


@pytest.fixture(scope="module")
def reference(hf_model):
    """prompt -> [len, vocab] log-softmax of transformers' logits (position i predicts i+1)."""
    model = hf_model(FAMILY)

    def logprobs(prompt: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)
    return logprobs


@pytest.fixture(scope="module")
def prompts(make_prompts):
    return make_prompts((1, 2, 9, 40, 77), seed=5)


def check(prompt, got, reference, k):
    """got: RequestOutput.prompt_logprobs; vLLM's shape, values and ranks."""
    want = reference(prompt)
    assert len(got) == len(prompt) and got[0] is None
    for i in range(1, len(prompt)):
        entry, row = got[i], want[i - 1]
        token = prompt[i]
        top = row.topk(k).indices.tolist() if k else []
        assert list(entry)[0] == token            # the actual token first, then the top-k
        assert set(entry) == {token, *top}
        for token_id, logprob in entry.items():
            assert abs(logprob.logprob - float(row[token_id])) < TOL, (i, token_id)
            # its rank among the vocabulary (a range where values tie within the tolerance)
            value = row[token_id]
            assert int((row > value + TOL).sum()) < logprob.rank <= int((row >= value - TOL).sum())
            assert logprob.decoded_token is not None


def params(k, **kw):
    return SamplingParams(**{"temperature": 0, "max_tokens": 3, "ignore_eos": True,
                             "prompt_logprobs": k, **kw})


def test_equal_to_transformers(checkpoint, prompts, reference):
    llm = LLM(checkpoint(FAMILY), max_model_len=256, enable_prefix_caching=False)
    for k in (0, 3):
        for prompt, out in zip(prompts, llm.generate(prompts, params(k), use_tqdm=False)):
            check(prompt, out.prompt_logprobs, reference, k)


def test_whole_vocabulary(checkpoint, prompts, reference):
    llm = LLM(checkpoint(FAMILY), max_model_len=256, max_logprobs=-1)
    vocab = llm.llm_engine.spec.vocab_size
    out = llm.generate([prompts[2]], params(-1), use_tqdm=False)[0]
    assert all(len(e) == vocab for e in out.prompt_logprobs[1:])
    check(prompts[2], out.prompt_logprobs, reference, vocab)


def test_chunked_prefill_and_mixed_batch(checkpoint, prompts, reference):
    """Chunks of 16 tokens; rows that do not ask get None and the same tokens as alone."""
    llm = LLM(checkpoint(FAMILY), max_model_len=256, max_num_batched_tokens=16,
              enable_prefix_caching=False)
    plain = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    alone = llm.generate(prompts, plain, use_tqdm=False)
    asked = [params(2) if i % 2 else plain for i in range(len(prompts))]
    outs = llm.generate(prompts, asked, use_tqdm=False)
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        if i % 2:
            check(prompt, out.prompt_logprobs, reference, 2)
        else:
            assert out.prompt_logprobs is None
            assert out.outputs[0].token_ids == alone[i].outputs[0].token_ids


def test_prefix_cache_hits_do_not_lose_them(checkpoint, make_prompts, reference):
    """A cached prefix is computed again for a request that asks (vLLM v1's rule), and its
    blocks still serve later requests that do not ask."""
    llm = LLM(checkpoint(FAMILY), max_model_len=256, block_size=16, enable_prefix_caching=True)
    shared = make_prompts((48,), seed=9)[0]
    first, second, third = (shared + tail for tail in make_prompts((5, 7, 3), seed=10))
    llm.generate([first], SamplingParams(max_tokens=2), use_tqdm=False)  # fills the cache
    out = llm.generate([second], params(4), use_tqdm=False)[0]
    check(second, out.prompt_logprobs, reference, 4)
    assert out.num_cached_tokens == 0
    later = llm.generate([third], SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert later.num_cached_tokens == 48


def test_preemption_does_not_repeat_them(checkpoint, prompts, reference):
    """A pool of 8 blocks of 16 tokens for 4 sequences of up to 100 tokens: sequences are
    preempted and recompute their prompts; each entry is still recorded once."""
    llm = LLM(checkpoint(FAMILY), max_model_len=128, block_size=16, num_gpu_blocks_override=8,
              max_num_batched_tokens=32)
    many = [prompts[3], prompts[4], prompts[3][:30], prompts[4][:50]]
    outs = llm.generate(many, params(1, max_tokens=20), use_tqdm=False)
    assert llm.llm_engine.num_preemptions > 0
    for prompt, out in zip(many, outs):
        check(prompt, out.prompt_logprobs, reference, 1)


def test_n_samples_share_one_list(checkpoint, prompts, reference):
    llm = LLM(checkpoint(FAMILY), max_model_len=256)
    out = llm.generate([prompts[3]], SamplingParams(n=3, seed=1, max_tokens=4,
                                                    prompt_logprobs=2), use_tqdm=False)[0]
    assert len(out.outputs) == 3
    check(prompts[3], out.prompt_logprobs, reference, 2)


def test_delta_outputs_carry_them_once(checkpoint, prompts, reference):
    llm = LLM(checkpoint(FAMILY), max_model_len=256)
    engine = llm.llm_engine
    engine.add_request("d", {"prompt_token_ids": prompts[3]},
                       params(1, max_tokens=4, output_kind=RequestOutputKind.DELTA))
    seen = []
    while engine.has_unfinished_requests():
        seen += [out.prompt_logprobs for out in engine.step()]
    assert len(seen) == 4 and all(p == [] for p in seen[1:])
    check(prompts[3], seen[0], reference, 1)


def test_bad_values_name_the_field(checkpoint):
    with pytest.raises(ValueError, match=r"prompt_logprobs=-2 is invalid"):
        SamplingParams(prompt_logprobs=-2)
    llm = LLM(checkpoint(FAMILY), max_model_len=64)
    with pytest.raises(ValueError, match=r"prompt_logprobs=21 is more than max_logprobs=20"):
        llm.generate(["hi"], SamplingParams(prompt_logprobs=21), use_tqdm=False)


def test_rows_only_for_owed_positions(checkpoint, prompts):
    """Logits rows are added for the positions still owing an entry, only in steps that hold
    them: steps of requests that do not ask carry none (their cost is unchanged)."""
    llm = LLM(checkpoint(FAMILY), max_model_len=256, max_num_batched_tokens=16,
              enable_prefix_caching=False)
    engine = llm.llm_engine
    seen, run = [], engine.runner.run

    def spy(batch):
        seen.append(batch.prompt_rows)
        return run(batch)
    engine.runner.run = spy
    engine.add_request("asks", {"prompt_token_ids": prompts[4]}, params(1, max_tokens=4))
    engine.add_request("plain", {"prompt_token_ids": prompts[3]},
                       SamplingParams(temperature=0, max_tokens=4))
    while engine.has_unfinished_requests():
        engine.step()
    with_rows = [rows for rows in seen if rows is not None]
    assert sum(rows.num_rows for rows in with_rows) == len(prompts[4]) - 1
    assert all(s.request_id == "asks" for rows in with_rows for s in rows.seqs)
    assert len(with_rows) == -(-len(prompts[4]) // 16)  # one per prefill chunk
    assert seen[-1] is None and len(seen) > len(with_rows)
