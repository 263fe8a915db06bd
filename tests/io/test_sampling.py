"""Per-row sampling overrides: every schema key accepted in range, rejected out of range."""
from __future__ import annotations

import pytest

from hpcinfer.io.sampling import SAMPLING_KEYS, check_sampling_overrides

VALID = {"n": 2, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "min_p": 0.5,
         "presence_penalty": -2.0, "frequency_penalty": 2, "repetition_penalty": 1.1,
         "max_tokens": 1, "min_tokens": 0, "stop": "###", "stop_token_ids": [0, 2],
         "ignore_eos": True, "seed": 0, "logprobs": 5, "skip_special_tokens": False,
         "include_stop_str_in_output": True, "structured_outputs": {"regex": "[a-z]+"}}


def test_every_schema_key_is_checked_and_valid_values_pass():
    assert set(VALID) == set(SAMPLING_KEYS)
    assert check_sampling_overrides(VALID) == (VALID, None)
    assert check_sampling_overrides({"seed": None, "stop": ["a", "b"]}) == ({"stop": ["a", "b"]}, None)


@pytest.mark.parametrize("key,value,words", [
    ("n", 0, ">= 1"), ("n", 1.0, "integer"), ("temperature", -0.1, "in [0.0"),
    ("temperature", float("nan"), "finite"), ("top_p", 0.0, "in (0.0"), ("top_p", 1.5, "1.0]"),
    ("top_k", -2, "-1 or 0"), ("min_p", 2, "1.0]"), ("presence_penalty", 3, "2.0]"),
    ("repetition_penalty", 0, "(0.0"), ("max_tokens", True, "integer"),
    ("min_tokens", -1, ">= 0"), ("stop", "", "empty"), ("stop_token_ids", [-1], "non-negative"),
    ("ignore_eos", 1, "true or false"), ("seed", "7", "integer"), ("logprobs", -1, ">= 0"),
])
def test_out_of_range_or_wrong_type_is_rejected_with_the_key(key, value, words):
    cleaned, problem = check_sampling_overrides({key: value})
    assert cleaned == {} and problem.startswith(f"sampling.{key} ") and words in problem


def test_unknown_key_suggests_the_close_one():
    _, problem = check_sampling_overrides({"max_token": 5})
    assert "did you mean 'max_tokens'" in problem
