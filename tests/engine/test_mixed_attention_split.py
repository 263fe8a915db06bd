"""Mixed steps with a DecodeSplit (decode kernel for the one-token rows, prefill kernel for
the chunks; layers/attention.py) give the tokens of the unsplit step and of torch_ref.

The triton backend runs under the Triton interpreter here (conftest sets TRITON_INTERPRET),
so the real kernels and launchers see the split's views and uploads."""
from __future__ import annotations

from hpcinfer import LLM, SamplingParams
from hpcinfer.testing.step_spy import watch_prepared

PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _generate(path, prompts, backend, split):
    llm = LLM(path, max_model_len=128, attention_backend=backend, max_num_batched_tokens=24,
              max_num_seqs=8, enable_prefix_caching=False)
    runner = llm.llm_engine.runner
    runner.split_mixed_attention = split   # on a GPU: set when the decode graphs are captured
    splits = watch_prepared(runner, lambda batch: batch.meta.decode_split is not None)
    outs = llm.generate(prompts, PARAMS, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], sum(splits)


def test_split_mixed_steps_equal_unsplit_and_reference(checkpoint, make_prompts):
    path = checkpoint("llama3")
    prompts = make_prompts((3, 30, 9, 17, 2, 40))
    split, num_split = _generate(path, prompts, "triton", True)
    unsplit, none = _generate(path, prompts, "triton", False)
    reference, _ = _generate(path, prompts, "torch_ref", False)
    assert num_split >= 3 and none == 0
    assert split == unsplit == reference
