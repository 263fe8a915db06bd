"""pydantic ValidationError -> one ConfigError that says where, what, and what to write."""
from __future__ import annotations

import difflib
import json
import re
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from hpcinfer.config.errors import ConfigError
from hpcinfer.config.yamlfile import Origins, locate

# Example values for required keys, shown in "add ..." fixes.
EXAMPLES = {
    "name": "my-job",
    "model": "{id: meta-llama/Llama-3.1-8B-Instruct}",
    "model.id": "meta-llama/Llama-3.1-8B-Instruct",
    "input": '{path: "data/*.jsonl"}',
    "input.path": '"data/*.jsonl"',
    "container.image": "/path/to/hpcinfer.sif",
}
# Sections whose one required key lets `section: value` be read as a typo for `{key: value}`.
_SHORTHAND = {"model": "id", "input": "path", "container": "image"}


def first_error(exc: ValidationError, data: Any, origins: Origins, default_file: str,
                model: type[BaseModel], prefix: str = "") -> ConfigError:
    """The earliest (by file line) problem in ``exc`` as a ConfigError."""
    errors = [_translate(err, data, origins, default_file, model, prefix)
              for err in exc.errors(include_url=False)]
    return min(errors, key=lambda e: (e.line is None, e.line or 0))


def _clean_loc(loc: tuple, data: Any) -> list:
    """Drop pydantic's internal loc parts (union branches, validator tags): keep data keys."""
    parts, node = [], data
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and isinstance(part, int) and part < len(node):
            node = node[part]
        elif isinstance(part, str) and not _looks_internal(part):
            node = None  # a key that is absent (missing / unknown): keep it, stop walking
        else:
            continue
        parts.append(part)
    return parts


def _looks_internal(part: str) -> bool:
    return any(ch in part for ch in "[]()") or part in ("str", "int", "float", "bool", "list")


def _translate(err: dict, data: Any, origins: Origins, default_file: str,
               model: type[BaseModel], prefix: str) -> ConfigError:
    parts = _clean_loc(err["loc"], data)
    key_path = ".".join(str(p) for p in ([prefix] if prefix else []) + parts)
    file, line = locate(origins, key_path, default_file)
    problem, fix = _describe(err, parts, key_path, model)
    return ConfigError(file, line, key_path, problem, fix)


def _describe(err: dict, parts: list, key_path: str, model: type[BaseModel]) -> tuple[str, str]:
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    key = str(parts[-1]) if parts else key_path
    if kind == "hpcinfer":
        return ctx["problem"], ctx["fix"]
    if kind == "extra_forbidden":
        return _unknown_key(parts, model)
    if kind == "missing":
        example = EXAMPLES.get(key_path.split(".", 1)[-1] if key_path.startswith("slurm.")
                               else key_path, "...")
        parent = ".".join(str(p) for p in parts[:-1])
        where = f" under {parent}" if parent else ""
        return "required key is missing", f"add `{key}: {example}`{where}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return _not_a_mapping(key, value)
    if kind in ("list_type", "tuple_type"):
        return f"expected a list, got {value!r}", f"write `{key}: [a, b]`"
    if kind.startswith("int_") or kind == "int_from_float":
        return (f"expected a whole number, got {value!r}",
                f"write a number without quotes or decimals, e.g. `{key}: 4`")
    if kind.startswith("float_"):
        return f"expected a number, got {value!r}", f"write e.g. `{key}: 0.5`"
    if kind.startswith("bool_"):
        return f"expected true or false, got {value!r}", f"write `{key}: true` or `{key}: false`"
    if kind == "string_type":
        return _not_text(key, parts, value)
    if kind == "literal_error":
        return _not_an_option(value, ctx)
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        bound = next(iter(ctx.values()), "")
        word = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
                "less_than_equal": "<="}[kind]
        return f"{value!r} is out of range", f"write a value {word} {bound}"
    if kind == "string_pattern_mismatch":
        return (f"{value!r} has characters that are not allowed",
                "use only letters, digits, '.', '_' and '-'")
    return f"{err['msg']} (got {value!r})", "see docs/config-reference.md"


def _unknown_key(parts: list, model: type[BaseModel]) -> tuple[str, str]:
    valid = _valid_keys(model, parts[:-1])
    bad = str(parts[-1])
    close = difflib.get_close_matches(bad, valid, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key {bad!r}", f"{hint}valid keys here: {', '.join(valid)}"


def _valid_keys(model: type[BaseModel], parts: list) -> list[str]:
    current: Any = model
    for part in parts:
        field = getattr(current, "model_fields", {}).get(part)
        current = _model_in(field.annotation) if field is not None else None
        if current is None:
            return []
    return list(current.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _not_a_mapping(key: str, value: Any) -> tuple[str, str]:
    problem = f"{key} must be a block of keys, got {value!r}"
    if key in _SHORTHAND and isinstance(value, str):
        return problem, f"write `{key}: {{{_SHORTHAND[key]}: {value}}}`"
    return problem, f"write `{key}:` followed by indented `key: value` lines"


def _not_text(key: str, parts: list, value: Any) -> tuple[str, str]:
    problem = f"expected text, got {value!r}"
    if value is None:
        return problem, f"give {key} a value"
    if isinstance(value, (dict, list)):
        return problem, "write a single value here, not a block or list"
    shown = json.dumps(value)  # true, 1.5: what YAML read
    if parts and isinstance(parts[-1], int):
        return problem, f"quote the list item: '{shown}'"
    return problem, f'quote it: `{key}: "{shown}"`'


def _not_an_option(value: Any, ctx: dict) -> tuple[str, str]:
    expected = str(ctx.get("expected", ""))
    quoted = re.findall(r"'([^']*)'", expected)
    options = quoted or re.findall(r"\d+", expected)
    # Near-spellings help for words ("chatt" -> "chat"), not for numbers (12 -> 128).
    close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.5) if quoted else []
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{value!r} is not allowed", f"{hint}write one of: {', '.join(options)}"
