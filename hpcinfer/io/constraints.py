"""Structured-outputs constraints in job files and rows: shape checks that need no xgrammar.

A constraint is a mapping with vLLM's StructuredOutputsParams keys (``json``, ``regex``,
``choice``, ``grammar``, ``json_object`` and the options). These checks run where xgrammar
cannot (it imports torch): ``hpcinfer validate`` on the login node and the reader of each
row, so a broken schema fails before a job is queued and a broken row becomes a bad row
before it reaches the engine. They catch what is cheap to know: JSON that does not parse,
unknown schema types, patterns Python cannot compile or that use what xgrammar's regex
engine lacks (lookaround, backreferences, word boundaries, inline flags and other ``(?...)``
groups but ``(?:`` and ``(?<name>``, possessive quantifiers, ``{,n}``), ``$ref`` pointing
nowhere, min above max, number bounds that leave no value or are not whole for an integer,
a grammar without a ``root`` rule, or using a rule it does not define exactly once. The
engine compiles the constraint and is the final judge: the worker compiles a job-level
constraint before loading the model and stops the job if it fails
(worker/constraint_check.py); a row whose own constraint fails there is a bad row
(docs/structured-outputs.md).
"""
from __future__ import annotations

import difflib
import functools
import json
import math
import re
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object")
OPTIONS = ("disable_any_whitespace", "disable_additional_properties", "disable_fallback")
KEYS = KINDS + OPTIONS
JSON_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
# Sub-schema keywords: (keyword, shape) where shape is "one", "list" or "map".
_SUBSCHEMAS = (("items", "one"), ("additionalProperties", "one"), ("not", "one"),
               ("contains", "one"), ("if", "one"), ("then", "one"), ("else", "one"),
               ("properties", "map"), ("patternProperties", "map"), ("$defs", "map"),
               ("definitions", "map"), ("prefixItems", "list"), ("anyOf", "list"),
               ("oneOf", "list"), ("allOf", "list"))
_BOUNDS = (("minItems", "maxItems"), ("minLength", "maxLength"),
           ("minProperties", "maxProperties"))
_NUMBER_BOUNDS = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
MAX_INT64 = 2 ** 63 - 1     # xgrammar's integer bounds are int64
_ROOT_RULE = re.compile(r"(^|\n)\s*root\s*::=")


def check_structured_outputs(value: Any, where: str = "structured_outputs") -> str | None:
    """None when ``value`` is a constraint these checks accept, else the problem in words.
    A ``json`` string must be JSON text here (job files resolve schema file paths first)."""
    if not isinstance(value, dict):
        return f"{where} must be an object with one of {', '.join(KINDS)}"
    for key in value:
        if key not in KEYS:
            near = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            return f"{where}.{key} is not a structured-outputs key{hint}; use {', '.join(KEYS)}"
    given = [k for k in KINDS if value.get(k) not in (None, False)]
    if len(given) != 1:
        return (f"{where} needs exactly one of {', '.join(KINDS)}, got "
                f"{', '.join(given) or 'none'}")
    for option in OPTIONS:
        if not isinstance(value.get(option, False), bool):
            return f"{where}.{option} must be true or false"
    kind = given[0]
    return _CHECKS[kind](value[kind], f"{where}.{kind}")


def looks_like_json_text(text: str) -> bool:
    """A ``json`` string holding the schema itself (else it names a schema file)."""
    return text.strip().startswith("{") or text.strip() in ("true", "false")


def check_json_schema(value: Any, where: str) -> str | None:
    """None when ``value`` (a schema, or JSON text of one) passes the checks, else the problem."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            return f"{where} is not valid JSON ({exc})"
    if isinstance(value, bool):
        return None
    if not isinstance(value, dict):
        return f"{where} must be a JSON schema (an object), got {type(value).__name__}"
    return schema_problem(value, value, where)


def schema_problem(schema: Any, root: dict, where: str) -> str | None:
    """The first problem found walking ``schema`` (a JSON schema node), or None."""
    if isinstance(schema, bool):
        return None
    if not isinstance(schema, dict):
        return f"{where} must be a schema (an object or true/false)"
    problem = (_type_problem(schema.get("type"), where)
               or _pattern_problem(schema.get("pattern"), f"{where}.pattern")
               or _keyword_problem(schema, root, where)
               or _bounds_problem(schema, where)
               or _number_problem(schema, where))
    if problem:
        return problem
    for keyword, shape in _SUBSCHEMAS:
        sub = schema.get(keyword)
        if sub is None:
            continue
        if shape == "one":
            children = [(f"{where}.{keyword}", sub)]
        elif shape == "map" and isinstance(sub, dict):
            children = [(f"{where}.{keyword}.{k}", v) for k, v in sub.items()]
        elif shape == "list" and isinstance(sub, list):
            children = [(f"{where}.{keyword}[{i}]", v) for i, v in enumerate(sub)]
        else:
            return f"{where}.{keyword} must be {'an object' if shape == 'map' else 'a list'}"
        for child_where, child in children:
            problem = schema_problem(child, root, child_where)
            if problem:
                return problem
    return None


def _type_problem(kind: Any, where: str) -> str | None:
    kinds = kind if isinstance(kind, list) else [kind]
    bad = [k for k in kinds if k is not None and k not in JSON_TYPES]
    if bad:
        near = difflib.get_close_matches(str(bad[0]), JSON_TYPES, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        return f"{where}.type {bad[0]!r} is not a JSON schema type{hint}"
    return None


def _pattern_problem(pattern: Any, where: str) -> str | None:
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        return f"{where} must be a string"
    return _check_regex(pattern, where, in_schema=True)


def _keyword_problem(schema: dict, root: dict, where: str) -> str | None:
    if "enum" in schema and not (isinstance(schema["enum"], list) and schema["enum"]):
        return f"{where}.enum must be a non-empty list"
    required = schema.get("required")
    if required is not None and not (isinstance(required, list)
                                     and all(isinstance(r, str) for r in required)):
        return f"{where}.required must be a list of property names"
    ref = schema.get("$ref")
    if ref is not None and _resolve_ref(ref, root) is None:
        return (f"{where}.$ref {ref!r} points nowhere: use a local reference such as "
                "'#/$defs/Name' to a definition in the same schema")
    return None


def _resolve_ref(ref: Any, root: dict) -> Any:
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    node: Any = root
    for part in [p for p in ref[1:].split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _bounds_problem(schema: dict, where: str) -> str | None:
    for low_key, high_key in _BOUNDS:
        low, high = schema.get(low_key), schema.get(high_key)
        for key, bound in ((low_key, low), (high_key, high)):
            if bound is not None and (isinstance(bound, bool)
                                      or not isinstance(bound, (int, float))):
                return f"{where}.{key} must be a number"
            if bound is not None and key.startswith(("minI", "maxI", "minL", "maxL", "minP",
                                                     "maxP")) and bound < 0:
                return f"{where}.{key} must be >= 0"
        if low is not None and high is not None and low > high:
            return f"{where}.{low_key} ({low}) is larger than {high_key} ({high})"
    return None


def _number_problem(schema: dict, where: str) -> str | None:
    """minimum/maximum and their exclusive forms: numbers, whole ones (in int64) for an
    integer, and leaving at least one value (xgrammar refuses an empty range)."""
    bounds = {k: schema[k] for k in _NUMBER_BOUNDS if k in schema}
    for key, bound in bounds.items():
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) \
                or not math.isfinite(bound):
            return (f"{where}.{key} must be a finite number (draft 4's boolean "
                    "exclusiveMinimum/exclusiveMaximum: write the bound itself there)")
    kind = schema.get("type")
    if "integer" in (kind if isinstance(kind, list) else [kind]):
        for key, bound in bounds.items():
            if bound != int(bound) or abs(bound) > MAX_INT64:
                return (f"{where}.{key} ({bound}) must be a whole number within int64 for "
                        "type integer")
        low = max([math.ceil(bounds[k]) for k in ("minimum",) if k in bounds]
                  + [math.floor(bounds[k]) + 1 for k in ("exclusiveMinimum",) if k in bounds],
                  default=None)
        high = min([math.floor(bounds[k]) for k in ("maximum",) if k in bounds]
                   + [math.ceil(bounds[k]) - 1 for k in ("exclusiveMaximum",) if k in bounds],
                   default=None)
        empty = low is not None and high is not None and low > high
    else:
        lows = [(v, k != "minimum") for k, v in bounds.items() if k.endswith("inimum")]
        highs = [(v, k != "maximum") for k, v in bounds.items() if k.endswith("aximum")]
        empty = any(lo > hi or (lo == hi and (lo_open or hi_open))
                    for lo, lo_open in lows for hi, hi_open in highs)
    if empty:
        shown = ", ".join(f"{k} {v}" for k, v in bounds.items())
        return f"{where} allows no number ({shown}): widen the range"
    return None


@functools.cache
def _regex(pattern: str) -> re.Pattern:
    """Compiled on first use: `hpcinfer render` imports this module and must stay fast."""
    return re.compile(pattern)


def _check_regex(value: Any, where: str, in_schema: bool = False) -> str | None:
    if not isinstance(value, str) or not value:
        return f"{where} must be a non-empty string"
    problem = regex_feature_problem(value, in_schema)
    if problem:
        return f"{where} {problem}"
    try:   # JSON schema's (ECMA) named groups (?<name>...) are Python's (?P<name>...)
        re.compile(_regex(_NAMED_GROUP).sub("(?P<", value))
    except re.error as exc:
        return f"{where} is not a valid regular expression ({exc})"
    return None


# An escaped "\\(?<a" rewritten too still compiles the same way in Python: harmless.
_NAMED_GROUP = r"\(\?<(?=[A-Za-z_])"
_COUNTED = r"\{\d+(,\d*)?\}"      # {m}, {m,}, {m,n}: a quantifier


def regex_feature_problem(pattern: str, in_schema: bool = False) -> str | None:
    """What ``pattern`` uses that xgrammar's regex engine lacks (None: nothing found).
    Walks the pattern once, skipping escaped characters and the insides of [...] classes.
    ``in_schema``: a JSON schema's ``pattern``, which xgrammar reads with more of ECMA's
    syntax (lookahead, a leading (?i), (?P<name>, possessive quantifiers)."""
    i, n, after_quantifier = 0, len(pattern), False
    while i < n:
        char = pattern[i]
        if char == "\\":
            problem = _escape_problem(pattern[i + 1:i + 2])
            if problem:
                return problem
            i, after_quantifier = i + 2, False
            continue
        if char == "[":
            if pattern[i + 1:i + 2] == "]":
                return ("puts ] first in a character class, which xgrammar reads as an empty "
                        "class: escape it as \\]")
            i, after_quantifier = _class_end(pattern, i), False
            continue
        if char == "+" and after_quantifier and not in_schema:
            return ("uses a possessive quantifier (++, *+, ?+, }+), which xgrammar does not "
                    "support: drop the second +")
        if char == "(" and pattern[i + 1:i + 2] == "?":
            problem = _group_problem(pattern[i + 2:i + 4], in_schema, at_start=i == 0)
            if problem:
                return problem
        if char == "{" and re.match(r"\{,\d+\}", pattern[i:]):
            return "uses {,n}, which xgrammar does not read: write {0,n}"
        counted = _regex(_COUNTED).match(pattern, i) if char == "{" else None
        if counted:
            i, after_quantifier = counted.end(), True
            continue
        # a quantifier; a ? right after one makes it lazy (a+?) and ends it
        after_quantifier = char in "*+?" and not (char == "?" and after_quantifier)
        i += 1
    return None


def _escape_problem(escaped: str) -> str | None:
    if escaped in ("b", "B"):
        return ("uses a word boundary (\\b, \\B), which xgrammar does not support: match "
                "the characters around it instead")
    if escaped and escaped in "123456789k":
        return "uses a backreference, which xgrammar does not support: rewrite it without"
    if escaped in ("p", "P", "N"):
        return (f"uses \\{escaped}, which xgrammar does not support: spell the characters "
                "out as a class such as [A-Za-z]")
    return None


def _group_problem(head: str, in_schema: bool, at_start: bool) -> str | None:
    """``head``: the two characters after ``(?``."""
    if head[:1] == ":" or (head[:1] == "<" and head[1:2] not in ("=", "!")):
        return None                       # (?:...) and ECMA named groups (?<name>...)
    if in_schema and (head[:1] in ("=", "!") or head == "P<" or (head == "i)" and at_start)):
        return None
    if head[:1] in ("=", "!") or head in ("<=", "<!"):
        return ("uses lookaround ((?=, (?!, (?<=, (?<!), which xgrammar does not support: "
                "rewrite it without")
    return (f"uses (?{head[:1]}, which xgrammar does not support (inline flags, (?P<name>, "
            "comments, atomic groups): use a plain group (...) or (?:...)")


def _class_end(pattern: str, start: int) -> int:
    """The index after the ] that closes the class opened at ``start``."""
    i = start + 1 + (pattern[start + 1:start + 2] == "^")
    i += pattern[i:i + 1] == "]"            # [^]...]: a literal ] (both engines agree)
    while i < len(pattern) and pattern[i] != "]":
        i += 2 if pattern[i] == "\\" else 1
    return i + 1


def _check_choice(value: Any, where: str) -> str | None:
    if isinstance(value, list) and value and all(isinstance(c, str) and c for c in value):
        return None
    return f"{where} must be a non-empty list of non-empty strings"


def _check_grammar(value: Any, where: str) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return f"{where} must be a non-empty EBNF grammar"
    if not _ROOT_RULE.search(value):
        return f"{where} has no root rule: the grammar starts at `root ::= ...`"
    problem = grammar_rule_problem(value)
    return f"{where} {problem}" if problem else None


_NAME = r"[A-Za-z_][A-Za-z0-9_.-]*"
_DEFINES = r"[ \t]*::="


def grammar_rule_problem(text: str) -> str | None:
    """An unclosed string, a rule defined twice or used but never defined (xgrammar's EBNF),
    else None. Conservative: syntax it does not follow (macros such as TagDispatch(...),
    lookahead (= ...)) gives no opinion; the worker's compile judges those."""
    defined: dict[str, int] = {}
    used: dict[str, int] = {}
    i, n = 0, len(text)
    while i < n:
        char, line = text[i], text.count("\n", 0, i) + 1
        if char.isspace() or char in "()|*+?{},0123456789":
            i += 1
        elif char == "#":
            i = _line_end(text, i)
        elif char == '"':
            i = _literal_end(text, i, '"')
            if i < 0:
                return f"has a string literal that is not closed on its line (line {line})"
        elif char == "[":
            i = _literal_end(text, i, "]")
            if i < 0:
                return None
        elif char.isascii() and (char.isalpha() or char == "_"):
            name = _regex(_NAME).match(text, i).group()
            i += len(name)
            if text.startswith("(", i):
                return None                   # a macro call: not followed here
            defines = _regex(_DEFINES).match(text, i)
            if defines:
                if name in defined:
                    return (f"defines rule {name!r} twice (lines {defined[name]} and {line}): "
                            "join the alternatives with | in one rule")
                defined[name] = line
                i = defines.end()
            else:
                used.setdefault(name, line)
        else:
            return None                       # syntax not followed here (e.g. "(=")
    missing = [(line, name) for name, line in used.items() if name not in defined]
    if missing:
        line, name = min(missing)
        return f"uses rule {name!r} (line {line}), which is not defined: add `{name} ::= ...`"
    return None


def _line_end(text: str, i: int) -> int:
    end = text.find("\n", i)
    return len(text) if end < 0 else end


def _literal_end(text: str, i: int, close: str) -> int:
    """The index after the ``close`` ending the literal opened at ``i``; -1 if the line
    ends first (EBNF literals do not span lines)."""
    i += 1
    while i < len(text) and text[i] != "\n":
        if text[i] == "\\":
            i += 2
        elif text[i] == close:
            return i + 1
        else:
            i += 1
    return -1


def _check_json_object(value: Any, where: str) -> str | None:
    return None if value is True else f"{where} must be true"


_CHECKS = {"json": check_json_schema, "regex": _check_regex, "choice": _check_choice,
           "grammar": _check_grammar, "json_object": _check_json_object}
