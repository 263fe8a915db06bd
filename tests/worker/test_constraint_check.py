"""worker/constraint_check.py in-process: the job-level constraint is compiled for the model's
tokenizer (what the worker does before loading the model), and the logits width is read from
config.json as the engine lays the tokenizer over it."""
from __future__ import annotations

import json

import pytest

from hpcinfer.worker.constraint_check import _vocab_size, compile_problem
from hpcinfer.worker.setup import TaskFailed


def test_good_and_bad_constraints(model_dir):
    assert compile_problem({"json": {"type": "object", "properties": {
        "a": {"type": "integer"}}, "required": ["a"]}}, str(model_dir)) is None
    assert compile_problem({"choice": ["yes", "no"]}, str(model_dir)) is None
    problem = compile_problem({"grammar": 'root ::= "a" |'}, str(model_dir))
    assert problem.startswith("structured_outputs.grammar does not compile: EBNF parser error")
    problem = compile_problem({"regex": "a", "choice": ["a"]}, str(model_dir))
    assert problem == ("structured_outputs: structured outputs take exactly one constraint "
                       "(json, regex, choice, grammar or json_object), got regex, choice")


def test_a_missing_tokenizer_says_what_to_fix(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TaskFailed, match="cannot load the tokenizer of .*point model.id"):
        compile_problem({"regex": "a"}, str(tmp_path))


@pytest.mark.parametrize("config, expected", [
    ({"vocab_size": 512}, 512), ({"text_config": {"vocab_size": 640}}, 640), ({}, 384),
    ({"vocab_size": "x"}, 384)])
def test_vocab_size_from_config(tmp_path, config, expected):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert _vocab_size(str(tmp_path), 384) == expected
