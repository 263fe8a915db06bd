"""YAML in, plain data plus the file:line of every key path out; and the layered merge.

Job files are read with YAML 1.2 scalar rules, not PyYAML's default YAML 1.1: under 1.1 an
unquoted ``time: 4:00:00`` is the base-60 integer 14400 and ``COUNTRY: NO`` is False, both silent
traps in a job file. Here only true/false are booleans and colons never make numbers.

Job files are small and written by hand, so the reader refuses what only an attack or an
accident produces, in well under a second and with one line: files over MAX_YAML_BYTES,
nesting deeper than MAX_DEPTH, and aliases that expand past MAX_NODES values (a nine-line
"billion laughs" file of nested ``&a``/``*a`` would otherwise take minutes of CPU and all the
memory; pyyaml composes aliases as shared nodes, so the walk below counts every expansion).

Origins map a dotted key path ("resources.time", "input.path.0") to (file, line), line 1-based.
"""
from __future__ import annotations

import re
from typing import Any

import yaml

from hpcinfer.config.errors import ConfigError

Origins = dict  # str key path -> tuple[str file, int | None line]

MAX_YAML_BYTES = 1 << 20     # a job file is a few KB; 1 MiB is generous
MAX_DEPTH = 20               # a job file nests 3 deep (resources.extra_sbatch.x)
MAX_NODES = 10_000           # values after alias expansion; a job file has ~100
_LIMIT_FIX = ("write the job file out plainly (no YAML anchors &x / aliases *x that repeat "
              "large blocks); a job file is a few kilobytes of keys")


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
    """One YAML scalar/flow value with the job-file rules (for ``--set k=v``).

    Raises yaml.YAMLError for bad syntax and ConfigError past the size limits."""
    label = f"--set value {text[:40]!r}"
    _check_bytes(text, label)
    loader = _Yaml12Loader(text)
    try:
        node = _compose(loader, label)
        if node is None:
            return None
        _walk(node, "", label, {}, _Budget(label))
        return loader.construct_document(node)
    finally:
        loader.dispose()


class _Budget:
    """Counts values as the walk expands aliases; raises once past MAX_NODES."""

    def __init__(self, label: str):
        self.label, self.num_nodes = label, 0

    def spend(self, node: yaml.Node, depth: int) -> None:
        self.num_nodes += 1
        line = node.start_mark.line + 1
        if self.num_nodes > MAX_NODES:
            raise ConfigError(self.label, line, "", f"the YAML expands to more than {MAX_NODES} "
                              "values (aliases repeating anchors, a \"billion laughs\" file?)",
                              _LIMIT_FIX)
        if depth > MAX_DEPTH:
            raise ConfigError(self.label, line, "", f"the YAML nests deeper than {MAX_DEPTH} "
                              "levels", "a job file nests a few levels: flatten it")


def _check_bytes(text: str, label: str) -> None:
    if len(text) <= MAX_YAML_BYTES:
        _check_flow_depth(text, label)
    else:
        raise ConfigError(label, None, "", f"the file is larger than the "
                          f"{MAX_YAML_BYTES // 1024} KiB a job file may have",
                          "is this the right file? put data in input files, not the job file")


_BRACKETS = re.compile(r"[\[\]{}]")
MAX_FLOW_DEPTH = 200     # generous: quoted text like "[INST]" may leave a bracket open


def _check_flow_depth(text: str, label: str) -> None:
    # pyyaml's scanner is quadratic in the depth of [ / { nesting (it re-checks every open
    # level per token): 5000 levels take seconds, a megabyte of them hours. Count first.
    depth = 0
    for match in _BRACKETS.finditer(text):
        depth = depth + 1 if match.group() in "[{" else max(depth - 1, 0)
        if depth > MAX_FLOW_DEPTH:
            line = text.count("\n", 0, match.start()) + 1
            raise ConfigError(label, line, "", "the YAML nests too deeply to read ([ or { "
                              f"more than {MAX_FLOW_DEPTH} levels deep)",
                              "a job file nests a few levels: flatten it")


def _compose(loader: yaml.SafeLoader, label: str) -> yaml.Node | None:
    try:
        return loader.get_single_node()
    except RecursionError:
        # pyyaml's parser recurses per nesting level: [[[[... thousands deep ends here.
        raise ConfigError(label, None, "", "the YAML nests too deeply to read",
                          "a job file nests a few levels: flatten it") from None


def read_yaml(text: str, label: str) -> tuple[Any, Origins]:
    """Parse ``text``; return (data, origins). ``label`` names the file in errors."""
    _check_bytes(text, label)
    loader = _Yaml12Loader(text)
    try:
        node = _compose(loader, label)
        if node is None:
            return None, {}
        origins: Origins = {}
        _walk(node, "", label, origins, _Budget(label))
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


def _walk(node: yaml.Node, prefix: str, label: str, origins: Origins, budget: _Budget,
          depth: int = 0) -> None:
    budget.spend(node, depth)
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
            _walk(value_node, path, label, origins, budget, depth + 1)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            path = f"{prefix}.{index}"
            origins[path] = (label, item.start_mark.line + 1)
            _walk(item, path, label, origins, budget, depth + 1)


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
