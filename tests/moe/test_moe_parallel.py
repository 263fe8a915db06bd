"""Tensor and expert parallelism of the MoE families on CPU: two real processes (gloo) each
load their part of a tiny checkpoint; logits (prefill, then decode) must equal one process's,
and so must the greedy tokens that follow from them.

TP=2 splits every expert's intermediate dimension (and the shared expert's, the dense
layers', the heads); EP=2 (expert_parallel=True) gives each rank half the experts whole.
EP needs an even expert count, so it runs on copies of the tiny configs with 6 or 8 experts.
"""
from __future__ import annotations

from hpcinfer.testing.gloo_ranks import MOE_RANK_SCRIPT, run_two_ranks
from hpcinfer.testing.tiny import TINY_MOE_FAMILIES, build_tiny_checkpoint, tiny_checkpoint


def test_tensor_and_expert_parallel_equal_one_process(tmp_path):
    # One process pair for every case: interpreter start-up dominates.
    even = {"mixtral": dict(num_local_experts=6), "qwen2_moe": dict(num_experts=8),
            "gpt_oss": dict(num_local_experts=6)}
    ep_paths = [str(build_tiny_checkpoint(f, tmp_path / f, **kw)) for f, kw in even.items()]
    ep_paths.append(str(tiny_checkpoint("qwen3_moe")))            # 6 experts already
    runs = [f"{tiny_checkpoint(f)}@tp" for f in TINY_MOE_FAMILIES] + [f"{p}@ep" for p in ep_paths]
    run_two_ranks(tmp_path, MOE_RANK_SCRIPT, runs)


def test_llm_with_expert_parallel_matches_transformers():
    # The vLLM-style entry point: one process asks for two ranks and expert parallelism.
    from hpcinfer import LLM, SamplingParams
    from hpcinfer.testing.greedy import hf_greedy, random_prompts
    path = str(tiny_checkpoint("qwen3_moe"))
    prompts = random_prompts((1, 9, 40), seed=5)
    llm = LLM(path, device="cpu", dtype="float32", tensor_parallel_size=2,
              enable_expert_parallel=True, max_model_len=128)
    experts = llm.llm_engine.runner.model.model.layers[1].mlp.experts
    assert experts.layout.num_local_experts == 3       # this rank holds 3 of the 6, whole
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)
    want = hf_greedy(path, prompts, max_new=12)
    assert [list(o.outputs[0].token_ids) for o in outs] == want
