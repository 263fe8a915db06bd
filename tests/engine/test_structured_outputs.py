"""Structured outputs (engine/structured.py) on a tiny RANDOM model: it tries everything the
mask allows, so every output parsing is the mask's doing, not the model's.

Each constraint kind runs greedy and seeded; outputs must parse, satisfy the schema / regex /
choice / grammar and end with finish_reason "stop". Free rows sharing a batch with
constrained ones must give exactly the tokens they give alone, with async scheduling on and
off. n > 1, preemption, chunked prefill, prefix caching and stop strings keep working.
"""
from __future__ import annotations

import json
import re

import pytest

from hpcinfer import LLM
from hpcinfer.sampling_params import (GuidedDecodingParams, SamplingParams,
                                      StructuredOutputsParams)

FAMILY = "llama"

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2}$"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                 "minItems": 1, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 6},
                           "active": {"type": "boolean"}},
            "required": ["name", "active"],
            "additionalProperties": False,
        },
    },
    "required": ["id", "kind", "code", "tags", "owner"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2,4}(\.[a-z]{1,3})?"
# Multi-token entries (the tiny tokenizer splits them) sharing prefixes.
CHOICES = ["Paged attention keeps blocks", "Paged memory", "Slurm cluster", "hello"]
# Arithmetic over one- or two-digit numbers, nested parentheses at most two deep.
GRAMMAR = """root ::= expr
expr ::= term (("+" | "-") term){0,3}
term ::= num | "(" inner ")"
inner ::= num (("+" | "-") num){0,2}
num ::= [1-9] [0-9]?
"""
EXPR = re.compile(r"(\d{1,2}|\(\d{1,2}([+-]\d{1,2}){0,2}\))([+-](\d{1,2}|\(\d{1,2}([+-]\d{1,2}){0,2}\)))*")


def check_schema(value) -> None:
    """SCHEMA, checked by hand (no jsonschema in the environment)."""
    assert isinstance(value, dict) and set(value) == set(SCHEMA["required"])
    assert isinstance(value["id"], int) and 0 <= value["id"] <= 999
    assert value["kind"] in ("cat", "dog", "bird")
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{2}", value["code"])
    assert 1 <= len(value["tags"]) <= 3 and all(
        isinstance(t, str) and len(t) <= 4 for t in value["tags"])
    owner = value["owner"]
    assert set(owner) == {"name", "active"} and isinstance(owner["active"], bool)
    assert isinstance(owner["name"], str) and len(owner["name"]) <= 6


def _constraints():
    return {
        "json": (StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True),
                 lambda text: check_schema(json.loads(text))),
        "json_text": (StructuredOutputsParams(json=json.dumps(SCHEMA), disable_any_whitespace=True),
                      lambda text: check_schema(json.loads(text))),
        "json_object": (StructuredOutputsParams(json_object=True, disable_any_whitespace=True),
                        None),   # any JSON object: checked by the max_tokens-free case below
        "regex": (StructuredOutputsParams(regex=REGEX),
                  lambda text: _assert(re.fullmatch(REGEX, text), text)),
        "choice": (StructuredOutputsParams(choice=CHOICES),
                   lambda text: _assert(text in CHOICES, text)),
        "grammar": (StructuredOutputsParams(grammar=GRAMMAR),
                    lambda text: _assert(EXPR.fullmatch(text), text)),
    }


def _assert(ok, text) -> None:
    assert ok, f"output {text!r} breaks its constraint"


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint(FAMILY), max_model_len=512)


@pytest.fixture(scope="module")
def prompts():
    return ["Hello", "A cluster schedules jobs", "def main():", "Numbers like 12345",
            "The quick brown fox"]


@pytest.mark.parametrize("kind", ["json", "json_text", "regex", "choice", "grammar"])
def test_every_output_is_valid_greedy_and_seeded(llm, prompts, kind):
    so, check = _constraints()[kind]
    params = [SamplingParams(temperature=0, max_tokens=300, structured_outputs=so)]
    params += [SamplingParams(temperature=1.0, seed=seed, max_tokens=300, structured_outputs=so)
               for seed in range(len(prompts) - 1)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out in outs:
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", completion
        check(completion.text)
    if kind == "choice":  # the entries really take several tokens each
        tok = llm.get_tokenizer()
        assert all(len(tok.encode(c, add_special_tokens=False)) > 1 for c in CHOICES[:3])
        assert any(len(o.outputs[0].token_ids) > 2 for o in outs)


def test_json_object(llm, prompts):
    """json_object: any JSON object. Its strings are unbounded, which a random model rarely
    closes within max_tokens, so the closing tokens get a logit bias (the mask still decides
    what is allowed: the bias only makes it end sooner)."""
    tok = llm.get_tokenizer()
    closing = {tok.convert_tokens_to_ids(t): 6.0 for t in ('"', "}", "]")}
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=300, logit_bias=closing,
                             structured_outputs=StructuredOutputsParams(
                                 json_object=True, disable_any_whitespace=s % 2 == 0))
              for s in range(len(prompts))]
    for out in llm.generate(prompts, params, use_tqdm=False):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", completion
        assert isinstance(json.loads(completion.text), dict)


def test_any_whitespace_is_the_default(llm, prompts):
    """vLLM's default: JSON may carry whitespace between tokens. A random model takes it
    wherever allowed; runs are capped at MAX_JSON_WHITESPACE characters, so even greedy rows
    reach the end of a bounded schema."""
    so = StructuredOutputsParams(json=SCHEMA)
    params = [SamplingParams(temperature=0, max_tokens=2000, structured_outputs=so)]
    params += [SamplingParams(temperature=1.0, seed=s, max_tokens=2000, structured_outputs=so)
               for s in range(len(prompts) - 1)]
    texts = []
    for out in llm.generate(prompts, params, use_tqdm=False):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", completion
        check_schema(json.loads(completion.text))
        texts.append(completion.text)
    assert any(re.search(r"[\s]{2}|[{,:]\s", t) for t in texts)


@pytest.mark.parametrize("cap", [4, 10 ** 6])
def test_whitespace_runs_are_capped_by_the_mask(llm, prompts, monkeypatch, cap):
    """Once a row's output ends in MAX_JSON_WHITESPACE whitespace characters, tokens made
    only of whitespace are not allowed (engine/structured.py WhitespaceCap), so a run ends at
    most one whitespace token past the cap; without the cap the random model's runs are
    longer (the check has teeth)."""
    from hpcinfer.engine import structured
    monkeypatch.setattr(structured, "MAX_JSON_WHITESPACE", cap)
    tok = llm.get_tokenizer()
    texts = [tok.decode([i]) for i in range(len(tok))]
    longest_token = max(len(t) for t in texts if t and not t.strip(" \t\n\r"))
    so = StructuredOutputsParams(json=SCHEMA)
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=400, structured_outputs=so)
              for s in range(2 * len(prompts))]
    runs = []
    for out in llm.generate(prompts * 2, params, use_tqdm=False):
        completion = out.outputs[0]
        runs.append(max((len(m) for m in re.findall(r"[ \t\n\r]+", completion.text)),
                        default=0))
        if cap == 4:
            assert completion.finish_reason == "stop", completion
            check_schema(json.loads(completion.text))
    if cap == 4:
        assert max(runs) <= cap - 1 + max(longest_token, 1), runs
    else:
        assert max(runs) > 4 - 1 + longest_token, runs


@pytest.mark.parametrize("async_scheduling,mask_kernel",
                         [(False, False), (True, False), (True, True)])
def test_free_rows_unchanged_by_constrained_neighbours(checkpoint, prompts, async_scheduling,
                                                        mask_kernel, monkeypatch):
    # mask_kernel: the bitmask applied by kernels/grammar_mask.py as on a GPU (here under the
    # interpreter) instead of its torch reference
    from hpcinfer.engine import structured
    monkeypatch.setattr(structured, "_mask_in_one_launch", lambda logits: mask_kernel)
    llm = LLM(checkpoint(FAMILY), max_model_len=512, async_scheduling=async_scheduling)
    free = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
            SamplingParams(temperature=0.9, seed=7, max_tokens=24, ignore_eos=True)]
    alone = llm.generate(prompts[:2], free, use_tqdm=False)
    constraints = _constraints()
    constrained = [SamplingParams(temperature=0, max_tokens=300,
                                  structured_outputs=constraints["json"][0]),
                   SamplingParams(temperature=0.8, seed=3, max_tokens=300,
                                  structured_outputs=constraints["grammar"][0]),
                   SamplingParams(temperature=0, max_tokens=300,
                                  structured_outputs=constraints["choice"][0])]
    mixed_prompts = [prompts[2], prompts[0], prompts[3], prompts[1], prompts[4]]
    mixed = llm.generate(mixed_prompts, [constrained[0], free[0], constrained[1], free[1],
                                         constrained[2]], use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone[0].outputs[0].token_ids
    assert mixed[3].outputs[0].token_ids == alone[1].outputs[0].token_ids
    for out, kind in zip((mixed[0], mixed[2], mixed[4]), ("json", "grammar", "choice")):
        assert out.outputs[0].finish_reason == "stop"
        constraints[kind][1](out.outputs[0].text)
    stats = llm.llm_engine.stats
    assert stats.num_grammar_masks > 0 and stats.grammar_mask_s > 0


def test_async_gives_the_synchronous_outputs(checkpoint, prompts):
    so = _constraints()["json"][0]
    params = [SamplingParams(temperature=0, max_tokens=300, structured_outputs=so),
              SamplingParams(temperature=1.0, seed=4, max_tokens=300, structured_outputs=so),
              SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)]
    results = []
    for async_scheduling in (False, True):
        llm = LLM(checkpoint(FAMILY), max_model_len=512, async_scheduling=async_scheduling)
        outs = llm.generate(prompts[:3], params, use_tqdm=False)
        results.append([(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs])
    assert results[0] == results[1]


def test_n_samples_each_walk_their_own_grammar(llm):
    so, check = _constraints()["grammar"]
    out = llm.generate(["Hello"], SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=200,
                                                  structured_outputs=so), use_tqdm=False)[0]
    texts = [c.text for c in out.outputs]
    assert len(set(texts)) > 1
    for completion in out.outputs:
        assert completion.finish_reason == "stop"
        check(completion.text)


def test_preemption_and_chunked_prefill_keep_the_matcher(checkpoint, prompts):
    """A KV pool too small for the batch preempts (recompute: the sequence keeps its tokens,
    so its matcher stays where it was); a small token budget chunks the prompts. Greedy
    outputs equal those of a roomy engine."""
    so = _constraints()["json"][0]
    long_prompts = [p * 12 for p in prompts]
    params = [SamplingParams(temperature=0, max_tokens=300, structured_outputs=so)] * 5
    roomy = LLM(checkpoint(FAMILY), max_model_len=512, enable_prefix_caching=True)
    want = [o.outputs[0].token_ids for o in roomy.generate(long_prompts, params, use_tqdm=False)]
    tight = LLM(checkpoint(FAMILY), max_model_len=512, num_gpu_blocks_override=40,
                max_num_batched_tokens=64, enable_prefix_caching=True)
    outs = tight.generate(long_prompts, params, use_tqdm=False)
    assert tight.llm_engine.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == want
    for out in outs:
        check_schema(json.loads(out.outputs[0].text))


def test_stop_string_cuts_a_constrained_row(llm):
    so = StructuredOutputsParams(choice=["Slurm cluster"])
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=20, stop=[" clu"],
                                                  structured_outputs=so), use_tqdm=False)[0]
    assert out.outputs[0].text == "Slurm"
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == " clu"


def test_guided_decoding_is_the_older_name(llm):
    guided = SamplingParams(temperature=0, max_tokens=40,
                            guided_decoding=GuidedDecodingParams.from_optional(regex=REGEX))
    assert guided.structured_outputs.regex == REGEX and guided.guided_decoding is None
    current = SamplingParams(temperature=0, max_tokens=40,
                             structured_outputs=StructuredOutputsParams(regex=REGEX))
    a, b = (llm.generate(["Hello"], p, use_tqdm=False)[0].outputs[0] for p in (guided, current))
    assert a.token_ids == b.token_ids and re.fullmatch(REGEX, a.text)


@pytest.mark.parametrize("so, words", [
    (dict(regex="a("), "structured_outputs.regex does not compile"),
    (dict(json='{"type": "strin"}'), "structured_outputs.json does not compile"),
    (dict(json="not json"), "structured_outputs.json does not compile"),
    (dict(grammar='expr ::= "a"'), "structured_outputs.grammar does not compile"),
])
def test_a_constraint_that_does_not_compile_is_a_value_error(llm, so, words):
    with pytest.raises(ValueError, match=re.escape(words)) as info:
        llm.generate(["Hello"], SamplingParams(structured_outputs=StructuredOutputsParams(**so)),
                     use_tqdm=False)
    assert "/project/cpp" not in str(info.value)  # xgrammar's source location is cut off
    # the engine is untouched: the next request runs
    assert llm.generate(["Hello"], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs


@pytest.mark.parametrize("kwargs, words", [
    (dict(), "exactly one constraint"),
    (dict(regex="a", choice=["a"]), "exactly one constraint"),
    (dict(choice=[]), "non-empty list"),
    (dict(json=3), "must be a dict or JSON text"),
    (dict(whitespace_pattern=" ", regex="a"), "whitespace_pattern is not supported"),
    (dict(structural_tag="{}"), "structural_tag is not supported"),
    (dict(regex="a", backend="outlines"), "uses xgrammar"),
])
def test_params_refuse_what_cannot_run(kwargs, words):
    with pytest.raises(ValueError, match=words):
        StructuredOutputsParams(**kwargs)


def test_sampling_params_checks():
    so = StructuredOutputsParams(regex="a")
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured_outputs=so)
    with pytest.raises(ValueError, match="older name"):
        SamplingParams(structured_outputs=so, guided_decoding=so)
    with pytest.raises(ValueError, match="StructuredOutputsParams"):
        SamplingParams(structured_outputs={"regex": "a"})


def test_compiled_once_per_distinct_constraint(llm):
    engine = llm.llm_engine
    so = StructuredOutputsParams(regex="[a-c]{2}")
    llm.generate(["Hello"] * 3, SamplingParams(max_tokens=10, structured_outputs=so),
                 use_tqdm=False)
    stage = engine.structured
    compiled = stage.compile(StructuredOutputsParams(regex="[a-c]{2}"))
    assert stage.compile(so) is compiled
    keys = [k for k in stage._compiled if k[0] == "regex" and k[1] == "[a-c]{2}"]
    assert len(keys) == 1


def test_cache_is_bounded_by_bytes(llm, monkeypatch):
    from hpcinfer.engine import structured
    llm.llm_engine._compile_grammar(SamplingParams(
        structured_outputs=StructuredOutputsParams(regex="a")), "x")   # makes the stage
    stage = llm.llm_engine.structured
    size = stage.compile(StructuredOutputsParams(regex="[a-c]{2}")).grammar.memory_size_bytes
    monkeypatch.setattr(structured, "MAX_CACHED_GRAMMAR_BYTES", 3 * size)
    for i in range(6):
        stage.compile(StructuredOutputsParams(regex=f"[a-c]{{{i + 3}}}"))
    assert stage._cached_bytes <= 3.5 * size and len(stage._compiled) <= 4
    assert stage._cached_bytes == sum(structured._size(v) for v in stage._compiled.values())


def test_threaded_and_single_thread_fills_agree(llm, prompts, monkeypatch):
    """Few rows fill their masks and accept on one thread, many in chunks on several
    (engine/grammar_threads.py): the same masks, so the same tokens."""
    from hpcinfer.engine import structured
    so = _constraints()["json"][0]
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=300, structured_outputs=so)
              for s in range(len(prompts))]
    single = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    stage = llm.llm_engine.structured
    monkeypatch.setattr(structured, "MIN_FILL_CHUNK_ROWS", 1)
    monkeypatch.setattr(structured, "FILL_CHUNK_S", 1e-9)      # a chunk per thread
    monkeypatch.setattr(structured, "ROWS_PER_ACCEPT_CHUNK", 1)
    monkeypatch.setattr(stage._threads, "max_threads", 3)
    monkeypatch.setattr(stage, "_fillers", [stage._fillers[0].__class__(1) for _ in range(3)])
    threaded = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert threaded == single
    assert stage._threads._pool is not None   # the helpers ran


def test_mask_vocabulary_is_the_tokenizers_with_its_stop_ids():
    from hpcinfer.engine.structured import mask_vocabulary
    assert mask_vocabulary(384, 512, {1}) == (384, [1])
    assert mask_vocabulary(384, 512, {500, 1}) == (384, [1])     # an id past the tokenizer
    assert mask_vocabulary(384, 512, {500}) == (512, [500])      # none inside: every logit
    assert mask_vocabulary(384, 384, {1}) == (384, [1])
    assert mask_vocabulary(600, 512, {1}) == (600, [1])          # tokenizer wider than logits
    assert mask_vocabulary(384, 512, set()) == (384, [])


@pytest.fixture(scope="module")
def padded_llm(tmp_path_factory):
    """The tiny llama with 512 logits for its 384-token tokenizer (padded embeddings)."""
    import torch
    from safetensors.torch import load_file, save_file

    from hpcinfer.testing.tiny import TOKENIZER_VOCAB_SIZE, build_tiny_checkpoint
    assert TOKENIZER_VOCAB_SIZE < 512
    path = build_tiny_checkpoint(FAMILY, tmp_path_factory.mktemp("padded"))
    generator = torch.Generator().manual_seed(0)
    padded = 0
    for shard in path.glob("*.safetensors"):
        tensors = load_file(shard)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in tensors:   # random rows, as large as the others
                weight = tensors[name]
                extra = torch.randn(512 - weight.shape[0], weight.shape[1],
                                    generator=generator) * weight.std()
                tensors[name] = torch.cat([weight, extra.to(weight.dtype)])
                padded += 1
        save_file(tensors, shard, metadata={"format": "pt"})
    assert padded >= 1
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "vocab_size": 512}))
    return LLM(str(path), max_model_len=512)


@pytest.mark.parametrize("kind", ["json", "regex", "grammar"])
def test_logits_past_the_tokenizer_are_never_allowed(padded_llm, prompts, kind):
    """The bitmask covers the tokenizer's 384 tokens (12 words a row, not 16); the 128 padded
    logits, random in this model and so often the largest of the few allowed ones, must still
    be -inf in constrained rows."""
    from hpcinfer.testing.tiny import TOKENIZER_VOCAB_SIZE
    so, check = _constraints()[kind]
    params = [SamplingParams(temperature=t, seed=s, max_tokens=300, structured_outputs=so)
              for t in (0.0, 1.0) for s in range(len(prompts))]
    outs = padded_llm.generate(prompts * 2, params, use_tqdm=False)
    stage = padded_llm.llm_engine.structured
    assert stage.mask_vocab == TOKENIZER_VOCAB_SIZE and stage._num_words == 12
    for out in outs:
        assert out.outputs[0].finish_reason == "stop"
        assert max(out.outputs[0].token_ids) < TOKENIZER_VOCAB_SIZE
        check(out.outputs[0].text)


def test_buffers_are_reused_and_host_time_is_split(llm, prompts):
    """The pinned/device bitmask buffers are made once (no allocation per step); the stage
    counts its fill, accept and apply time for the bench's breakdown."""
    so, _ = _constraints()["json"]
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=300, structured_outputs=so)
    llm.generate(prompts, params, use_tqdm=False)
    stage = llm.llm_engine.structured
    buffers = (stage._host.data_ptr(), stage._dev.data_ptr())
    before = (stage.fill_s, stage.accept_s, stage.apply_s, stage.num_masks, stage.mask_s)
    llm.generate(prompts, params, use_tqdm=False)
    assert (stage._host.data_ptr(), stage._dev.data_ptr()) == buffers
    after = (stage.fill_s, stage.accept_s, stage.apply_s, stage.num_masks, stage.mask_s)
    assert all(a > b for a, b in zip(after, before))
