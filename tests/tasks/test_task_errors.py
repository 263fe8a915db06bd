"""task= resolution and the errors a wrong call gets (each says what to do)."""
from __future__ import annotations

import pytest

from hpcinfer import LLM, SamplingParams
from hpcinfer.testing.tiny import tiny_checkpoint
from hpcinfer.testing.tiny_pooling import tiny_pooling_checkpoint


def test_auto_task_follows_architectures():
    assert LLM(str(tiny_pooling_checkpoint("xlm-roberta")), device="cpu").task == "embed"
    assert LLM(str(tiny_pooling_checkpoint("qwen3-cls")), device="cpu").task == "classify"
    assert LLM(str(tiny_checkpoint("llama")), device="cpu").task == "generate"


def test_runner_and_convert_as_in_newer_vllm():
    bert_cls = str(tiny_pooling_checkpoint("bert-cls"))
    assert LLM(bert_cls, runner="pooling", device="cpu").task == "classify"
    with pytest.raises(ValueError, match="task='reward' needs a decoder"):
        LLM(bert_cls, runner="pooling", convert="reward", device="cpu")
    assert LLM(str(tiny_checkpoint("qwen3")), runner="pooling", device="cpu").task == "embed"
    assert LLM(str(tiny_checkpoint("qwen3")), runner="generate", device="cpu").task == "generate"


def test_wrong_task_for_the_model_is_refused():
    with pytest.raises(ValueError, match="task='classify' does not fit.*causal LM.*"
                                         "task='embed'"):
        LLM(str(tiny_checkpoint("llama")), task="classify", device="cpu")
    with pytest.raises(ValueError, match="runner='pool'"):
        LLM(str(tiny_checkpoint("llama")), runner="pool", device="cpu")
    with pytest.raises(ValueError, match="task='generate' does not fit.*pooling model"):
        LLM(str(tiny_pooling_checkpoint("bert")), task="generate", device="cpu")
    with pytest.raises(ValueError, match="task='reward' needs a decoder"):
        LLM(str(tiny_pooling_checkpoint("bert-cls")), task="reward", device="cpu")
    with pytest.raises(ValueError, match="task='embedding' is not supported"):
        LLM(str(tiny_pooling_checkpoint("bert")), task="embedding", device="cpu")


def test_methods_outside_the_task_say_which_task_to_use():
    gen = LLM(str(tiny_checkpoint("qwen2")), device="cpu")
    with pytest.raises(ValueError, match=r"LLM.embed\(\) is not available for task='generate'"):
        gen.embed("hello")
    bert = LLM(str(tiny_pooling_checkpoint("bert")), device="cpu")
    with pytest.raises(ValueError, match="task='embed'.*generate"):
        bert.generate("hello", SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match=r"LLM.classify\(\) is not available.*task='classify'"):
        bert.classify("hello")
    with pytest.raises(ValueError, match=r"LLM.reward\(\) is not available"):
        bert.reward("hello")


def test_long_prompts_are_refused_or_truncated():
    path = str(tiny_pooling_checkpoint("bert"))
    llm = LLM(path, device="cpu", max_model_len=8)
    long = "the quick brown fox jumps over the lazy dog again"
    with pytest.raises(ValueError, match="prompt 1: .* more than max_model_len=8.*"
                                         "truncate_prompt_tokens=-1"):
        llm.embed(["hello", long])
    out = llm.embed([long], truncate_prompt_tokens=-1)[0]
    assert len(out.prompt_token_ids) == 8
    # the tokenizer truncates (keeping [CLS] ... [SEP]); the result equals embedding those ids
    same = llm.embed([out.prompt_token_ids])[0]
    assert same.outputs.embedding == out.outputs.embedding
    assert len(llm.embed([long], truncate_prompt_tokens=5)[0].prompt_token_ids) == 5


def test_bad_prompts_name_their_index():
    llm = LLM(str(tiny_pooling_checkpoint("bert")), device="cpu")
    with pytest.raises(ValueError, match="prompt 1: token id 99999 is outside"):
        llm.embed([[2, 3], [2, 99999]])
    with pytest.raises(ValueError, match="prompt 0: the prompt is empty"):
        llm.embed([[]])
    with pytest.raises(ValueError, match="pooling_params must be a PoolingParams"):
        llm.embed("x", pooling_params=[1])


def test_pooling_tasks_refuse_parallel_ranks():
    with pytest.raises(ValueError, match="task='embed' runs on one device.*tensor_parallel_size=1"):
        LLM(str(tiny_pooling_checkpoint("bert")), device="cpu", tensor_parallel_size=2)


def test_max_model_len_limits():
    path = str(tiny_pooling_checkpoint("xlm-roberta"))  # 128 positions, 2 taken by the offset
    assert LLM(path, device="cpu").llm_engine.max_model_len == 126
    with pytest.raises(ValueError, match="max_model_len=127 is larger than the model's 126"):
        LLM(path, device="cpu", max_model_len=127)
