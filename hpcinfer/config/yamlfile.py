"""YAML in, plain data plus the file:line of every key path out; and the layered merge.

Job files are read with YAML 1.2 scalar rules, not PyYAML's default YAML 1.1: under 1.1 an
unquoted ``time: 4:00:00`` is the base-60 integer 14400 and ``COUNTRY: NO`` is False, both silent
traps in a job file. Here only true/false are booleans and colons never make numbers.

Origins map a dotted key path ("resources.time", "input.path.0") to (file, line), line 1-based.
"""
from __future__ import annotations

import re
from typing import Any

import yaml

from hpcinfer.config.errors import ConfigError

Origins = dict  # str key path -> tuple[str file, int | None line]


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema booleans, ints and floats (and no timestamps)."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers
            if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int",
                           "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
    list("-+0123456789"))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if text.startswith("0o"):
        return int(text[2:], 8)
    return int(text, 0) if text.startswith("0x") else int(text, 10)


_Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def parse_value(text: str) -> Any:
    """One YAML scalar/flow value with the job-file rules (for ``--set k=v``)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - SafeLoader subclass


def read_yaml(text: str, label: str) -> tuple[Any, Origins]:
    """Parse ``text``; return (data, origins). ``label`` names the file in errors."""
    loader = _Yaml12Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        origins: Origins = {}
        _walk(node, "", label, origins)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        raise _syntax_error(exc, label) from None
    except yaml.YAMLError as exc:
        raise ConfigError(label, None, "", f"not valid YAML: {exc}",
                          "fix the YAML syntax") from None
    finally:
        loader.dispose()
    return data, origins


def _syntax_error(exc: yaml.MarkedYAMLError, label: str) -> ConfigError:
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark else None
    column = f" (column {mark.column + 1})" if mark else ""
    problem = f"YAML syntax error{column}: {exc.problem or exc.context}"
    if exc.context and exc.problem:
        problem += f" ({exc.context})"
    fix = "check indentation (spaces, not tabs) and quote values that contain ': ' or '#'"
    if "\t" in (exc.problem or "") or "tab" in (exc.problem or ""):
        fix = "indent with spaces, not tabs"
    return ConfigError(label, line, "", problem, fix)


def _walk(node: yaml.Node, prefix: str, label: str, origins: Origins) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            path = f"{prefix}.{key}" if prefix else key
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(label, line, path,
                                  f"duplicate key (first set on line {seen[key]})",
                                  "keep one of them")
            seen[key] = line
            origins[path] = (label, line)
            _walk(value_node, path, label, origins)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            path = f"{prefix}.{index}"
            origins[path] = (label, item.start_mark.line + 1)
            _walk(item, path, label, origins)


def locate(origins: Origins, key_path: str, default_file: str) -> tuple[str, int | None]:
    """(file, line) of ``key_path``, falling back to its nearest parent that has one."""
    path = key_path
    while path:
        if path in origins:
            return origins[path]
        path = path.rpartition(".")[0]
    return default_file, None


def merge(base: dict, base_origins: Origins, top: dict, top_origins: Origins,
          prefix: str = "") -> tuple[dict, Origins]:
    """Deep-merge ``top`` over ``base``: mappings merge, anything else (lists, null) replaces."""
    merged = dict(base)
    origins = dict(base_origins) if not prefix else base_origins
    for key, value in top.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key], origins = merge(merged[key], origins, value, top_origins, path)
        else:
            _drop_under(origins, path)
            merged[key] = value
            origins.update({p: o for p, o in top_origins.items()
                            if p == path or p.startswith(path + ".")})
        if path in top_origins:
            origins[path] = top_origins[path]
    return merged, origins


def _drop_under(origins: Origins, path: str) -> None:
    for stale in [p for p in origins if p == path or p.startswith(path + ".")]:
        del origins[stale]
