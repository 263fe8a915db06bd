"""Per-row sampling overrides: keys and ranges checked here, without importing the engine.

The key list mirrors the job schema's ``sampling:`` block. A row whose overrides fail a
check becomes a bad row; the worker merges the (already valid) overrides over the job's
sampling config when it builds the engine's SamplingParams.
"""
from __future__ import annotations

import difflib
import json
import math
from typing import Any, Callable

from hpcinfer.io.constraints import check_structured_outputs

# key -> check(value) returning None when valid, else the problem in words.
_Check = Callable[[Any], "str | None"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _int_at_least(low: int) -> _Check:
    def check(v: Any) -> str | None:
        if not _is_int(v):
            return f"must be an integer, got {type(v).__name__}"
        return None if v >= low else f"must be >= {low}, got {v}"
    return check


def _number_in(low: float, high: float, *, low_open: bool = False) -> _Check:
    def check(v: Any) -> str | None:
        if not _is_number(v):
            return f"must be a finite number, got {v!r}"
        if (v <= low if low_open else v < low) or v > high:
            bracket = "(" if low_open else "["
            return f"must be in {bracket}{low}, {high}], got {v}"
        return None
    return check


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"must be true or false, got {v!r}"


def _optional(check: _Check) -> _Check:
    return lambda v: None if v is None else check(v)


def _top_k(v: Any) -> str | None:
    if not _is_int(v):
        return f"must be an integer, got {type(v).__name__}"
    return None if v >= -1 else f"must be -1 or 0 (off) or >= 1, got {v}"


def _stop(v: Any) -> str | None:
    if isinstance(v, str):
        return None if v else "must not be an empty string"
    if isinstance(v, list) and all(isinstance(s, str) and s for s in v):
        return None
    return "must be a non-empty string or a list of non-empty strings"


def _stop_token_ids(v: Any) -> str | None:
    if isinstance(v, list) and all(_is_int(t) and t >= 0 for t in v):
        return None
    return "must be a list of non-negative integers"


SAMPLING_CHECKS: dict[str, _Check] = {
    "n": _int_at_least(1),
    "temperature": _number_in(0.0, math.inf),
    "top_p": _number_in(0.0, 1.0, low_open=True),
    "top_k": _top_k,
    "min_p": _number_in(0.0, 1.0),
    "presence_penalty": _number_in(-2.0, 2.0),
    "frequency_penalty": _number_in(-2.0, 2.0),
    "repetition_penalty": _number_in(0.0, math.inf, low_open=True),
    "max_tokens": _int_at_least(1),
    "min_tokens": _int_at_least(0),
    "stop": _stop,
    "stop_token_ids": _stop_token_ids,
    "ignore_eos": _bool,
    "seed": _optional(_int_at_least(0)),
    "logprobs": _optional(_int_at_least(0)),
    "skip_special_tokens": _bool,
    "include_stop_str_in_output": _bool,
    # checked by check_structured_outputs (its messages name the nested key)
    "structured_outputs": lambda v: None,
}
SAMPLING_KEYS = tuple(SAMPLING_CHECKS)


def check_sampling_overrides(overrides: Any) -> tuple[dict, str | None]:
    """(overrides without null values, None) or ({}, problem) for one row's sampling dict.

    Null values mean "not overridden" (Parquet struct columns fill absent keys with null).
    """
    if not isinstance(overrides, dict):
        return {}, f"sampling overrides must be an object, got {type(overrides).__name__}"
    cleaned = {k: v for k, v in overrides.items() if v is not None}
    for key, value in cleaned.items():
        check = SAMPLING_CHECKS.get(key)
        if check is None:
            near = difflib.get_close_matches(str(key), SAMPLING_KEYS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            return {}, (f"unknown sampling key {key!r}{hint}; valid keys: "
                        f"{', '.join(SAMPLING_KEYS)}")
        if key == "structured_outputs":
            value = cleaned[key] = _parsed(value)
            problem = check_structured_outputs(value, "sampling.structured_outputs")
            if problem:
                return {}, problem
            continue
        problem = check(value)
        if problem:
            return {}, f"sampling.{key} {problem}"
    if "min_tokens" in cleaned and "max_tokens" in cleaned \
            and cleaned["min_tokens"] > cleaned["max_tokens"]:
        return {}, (f"sampling.min_tokens ({cleaned['min_tokens']}) is larger than "
                    f"sampling.max_tokens ({cleaned['max_tokens']})")
    if "structured_outputs" in cleaned and cleaned.get("min_tokens"):
        return {}, ("sampling.min_tokens must be 0 with structured_outputs (the constraint "
                    "decides where the output ends)")
    return cleaned, None


def _parsed(value: Any) -> Any:
    """A constraint stored as JSON text (a Parquet string column) as a mapping; null keys
    dropped (a Parquet struct column fills the keys a row does not set with null)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return value    # check_structured_outputs says it is not an object
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if v is not None}
    return value
