"""LLM.beam_search equals transformers' generate(num_beams=w, do_sample=False) on a tiny
fp32 model: the same sequences in the same order and the same scores (to 1e-5), for
length_penalty and each early_stopping value, with EOS reached and ignored."""
from __future__ import annotations

import pytest
import torch

from hpcinfer import LLM
from hpcinfer.beam_search import BeamSearchOutput
from hpcinfer.sampling_params import BeamSearchParams

FAMILY = "llama"
TOL = 1e-5
MAX_NEW = 10


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint(FAMILY), max_model_len=128, block_size=4)


@pytest.fixture(scope="module")
def prompts(make_prompts):
    return make_prompts((5, 17), seed=3)


@pytest.fixture(scope="module")
def frequent_token(llm, prompts):
    """A token the model's beams meet within a few steps: used as EOS, so finished
    hypotheses, their scores and the stopping rules are exercised (the random model's real
    EOS is almost never likely)."""
    out = llm.beam_search([{"prompt_token_ids": prompts[0]}],
                          BeamSearchParams(beam_width=3, max_tokens=4, ignore_eos=True))
    return out[0].sequences[1].tokens[len(prompts[0]) + 2]


def reference(model, prompt, width, eos, length_penalty, early_stopping):
    """transformers' sequences (generated part) and scores, best first."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                             do_sample=False, num_beams=width, num_return_sequences=width,
                             max_new_tokens=MAX_NEW, length_penalty=length_penalty,
                             early_stopping=early_stopping, eos_token_id=eos, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
    generated = out.sequences[:, len(prompt):]
    if width > 1:
        return generated.tolist(), out.sequences_scores.tolist()
    # num_beams=1 is greedy search there: the same score from its per-step logprobs
    steps = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    return generated.tolist(), [float(steps.sum()) / steps.shape[1] ** length_penalty]


@pytest.mark.parametrize("width, length_penalty, early_stopping, use_eos", [
    (3, 1.0, False, True), (3, 2.0, True, True), (3, 0.5, "never", True),
    (4, 1.0, False, False), (1, 1.0, False, True)],
    ids=["lp1-heuristic", "lp2-early", "lp0.5-never", "ignore-eos", "width1"])
def test_equal_to_transformers(llm, hf_model, prompts, frequent_token, width, length_penalty,
                               early_stopping, use_eos):
    engine = llm.llm_engine
    eos = frequent_token if use_eos else None
    saved = engine.eos_token_ids
    engine.eos_token_ids = frozenset([frequent_token])
    try:
        outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], BeamSearchParams(
            beam_width=width, max_tokens=MAX_NEW, ignore_eos=not use_eos,
            length_penalty=length_penalty, early_stopping=early_stopping))
    finally:
        engine.eos_token_ids = saved
    num_eos_ends = 0
    for prompt, out in zip(prompts, outs):
        want_tokens, want_scores = reference(hf_model(FAMILY), prompt, width, eos,
                                             length_penalty, early_stopping)
        assert isinstance(out, BeamSearchOutput) and len(out.sequences) == width
        for seq, tokens, score in zip(out.sequences, want_tokens, want_scores):
            generated = seq.tokens[len(prompt):]
            assert seq.tokens[:len(prompt)] == prompt
            assert generated == tokens[:len(generated)]
            # transformers pads shorter ones with pad_token_id, or EOS when that is 0
            assert all(t == (eos or 0) for t in tokens[len(generated):])
            ours = seq.cum_logprob / len(generated) ** length_penalty
            assert abs(ours - score) < TOL
            assert abs(seq.cum_logprob - sum(lp[t].logprob for lp, t in
                                              zip(seq.logprobs, generated))) < TOL
            assert seq.text == llm.get_tokenizer().decode(seq.tokens)
            num_eos_ends += seq.finish_reason == "stop"
            assert seq.finish_reason == ("stop" if generated[-1] == eos else "length")
    if width == 3 and length_penalty <= 1:  # a short EOS-ended sequence is among the best
        assert num_eos_ends > 0
    assert use_eos or num_eos_ends == 0


def test_beams_share_kv_and_free_it(llm, prompts):
    engine = llm.llm_engine
    hits = engine.block_manager.prefix_cache_hits
    params = BeamSearchParams(beam_width=3, max_tokens=8, ignore_eos=True)
    together = llm.beam_search(prompts, params)
    assert engine.block_manager.prefix_cache_hits > hits  # forks reuse their parent's blocks
    bm = engine.block_manager
    bm.check_invariants([])
    assert bm.num_free_blocks == bm.num_blocks
    one_at_a_time = llm.beam_search(prompts, params, concurrency_limit=1)
    assert [[s.tokens for s in o.sequences] for o in together] == \
        [[s.tokens for s in o.sequences] for o in one_at_a_time]


def test_bad_params_name_the_field(llm):
    with pytest.raises(ValueError, match=r"BeamSearchParams.beam_width=0 is invalid"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match=r"BeamSearchParams.early_stopping='sometimes'"):
        BeamSearchParams(beam_width=2, max_tokens=4, early_stopping="sometimes")
    with pytest.raises(ValueError, match=r"prompt 0: .*more than max_model_len=128"):
        llm.beam_search([list(range(10, 140))], BeamSearchParams(beam_width=2, max_tokens=4))
