"""The login-side constraint checks (io/constraints.py, no xgrammar) against xgrammar itself.

For each regex, schema pattern, grammar and number range below, `hpcinfer validate`'s verdict must be
xgrammar's: a constraint xgrammar compiles is never refused on the login node, and each one
it refuses for a reason the checks know is refused there, before the job is queued. What the
checks cannot see (listed in LEFT_TO_THE_WORKER) is compiled by the worker before it loads
the model (tests/worker/test_structured_outputs_job.py).
"""
from __future__ import annotations

import json

import pytest
import xgrammar as xgr

from hpcinfer.io.constraints import check_structured_outputs

# (regex, xgrammar compiles it as a whole-output regex)
REGEXES = [
    (r"(?:ab)+", True), (r"\(?[0-9]{3}\)?", True), (r"[(?i)]", True), (r"[\b]", True),
    (r"\\b", True), (r"a{0,3}", True), (r"a{3,}", True), (r"a+?", True), (r"a??", True),
    (r"a{2,3}?", True), (r"[^]a]", True), (r"[a\]]", True), (r"(?<n>x)", True),
    (r"(?<n>a)(?:b)", True), (r"\d\w\s\D\W\S", True), (r"\x41\u0041", True), (r"^a$", True),
    (r"x}+", True), (r"[+]+", True), (r"\++", True), (r"\{,3\}", True), (r"[^\]]+", True),
    (r"[\w.-]+@[\w-]+\.[a-z]{2,}", True), (r"\\(?<n>x)", True),
    (r"a{2}+", False), (r"a?+", False), (r"a*+", False), (r"a++", False), (r"[]a]", False),
    (r"\N{DIGIT ONE}", False), (r"a{,3}", False), (r"\bx", False), (r"\Bx", False),
    (r"(?i)x", False), (r"(?P<n>x)", False), (r"(?#c)x", False), (r"(?s:.)", False),
    (r"(?>a)", False), (r"\p{L}", False), (r"(?=x)", False), (r"(?<=x)a", False),
    (r"(?<!x)a", False), (r"(a)\1", False), (r"\k<n>", False), (r"x{2,1}", False),
]
# JSON schema patterns: xgrammar reads more of ECMA's syntax there
PATTERNS = [
    (r"a++", True), (r"(?i)abc", True), (r"(?P<n>x)", True), (r"(?=x)x", True),
    (r"a(?!b)c", True), (r"(?<n>a)", True), (r"^[A-Z]{2}-[0-9]{2}$", True),
    (r"\bword\b", False), (r"(?>a)", False), (r"(?#c)a", False), (r"x(?i)y", False),
    (r"(?i:a)", False), (r"a(?<=a)", False), (r"[]a]", False), (r"a{,3}", False),
    (r"\p{L}", False),
]
NUMBERS = [
    ({"type": "integer", "minimum": 1.0}, True), ({"type": "number", "minimum": 1.5}, True),
    ({"type": "number", "minimum": 5, "maximum": 5}, True),
    ({"type": "integer", "multipleOf": 0.5}, True),
    ({"type": "integer", "minimum": 4, "exclusiveMaximum": 6}, True),
    ({"type": "integer", "minimum": 1.5}, False),
    ({"type": "integer", "exclusiveMinimum": 1.5}, False),
    ({"type": ["integer", "null"], "minimum": 1.5, "maximum": 1.7}, False),
    ({"type": "integer", "minimum": 1e20}, False),
    ({"type": "integer", "exclusiveMinimum": 4, "exclusiveMaximum": 5}, False),
    ({"type": "integer", "minimum": 5, "exclusiveMaximum": 5}, False),
    ({"type": "number", "exclusiveMinimum": 5, "maximum": 5}, False),
    ({"type": "number", "minimum": 6, "exclusiveMaximum": 5}, False),
    ({"type": "number", "exclusiveMinimum": True, "minimum": 3}, False),
]
GRAMMARS = [
    ('root ::= "(" num ("," num){0,3} ")"\nnum ::= [1-9] [0-9]?', True),
    ('root ::= a-b\na-b ::= "x"', True), ('root ::= "a" (= "b")', True),
    ('root ::= [a-z]+ # c\n', True), ('root ::= x\nx ::= "a" | ""', True),
    ('root ::= TagDispatch(("a", x), loop_after_dispatch=true)\nx ::= "b"', True),
    ('root ::= "a"\n\n  | "b"', True), ('root ::= "\\u00e9"', True),
    ('root ::= ws\nws ::= [ \\t\\n]*', True), ('root ::= "\\"" [^"\\\\]* "\\""', True),
    ('root ::= [\\]] "x"', True), ('root ::= "#" x\nx ::= "y"', True),
    ('x ::= "b"\nroot ::= "a"', True), ('root ::= x_1\nx_1 ::= "a"', True),
    ('root ::= "yes" | "no" | "q\\"uote"', True),
    ("root ::= foo", False), ('root ::= "(" num ")"\nnums ::= [0-9]+', False),
    ('root ::= "a"\nroot ::= "b"', False), ('root ::= "a\nb"', False),
    ('root ::= a.b', False), ('root ::= "a', False),
]
# Refused by xgrammar, passed by the login checks: the worker's start check finds these.
LEFT_TO_THE_WORKER = [
    {"grammar": 'root ::= "a" |'}, {"grammar": "root ::= [z-a]"},
    {"grammar": 'root ::= "a"{3,1}'}, {"grammar": 'root ::= "a"\nfoo := "b"'},
    {"json": {"type": "object", "minProperties": 2}},
    {"json": {"type": "object", "required": ["a"], "properties": {"a": False}}},
    {"json": {"$defs": {"A": {"$ref": "#/$defs/A"}}, "$ref": "#/$defs/A"}},
    {"regex": r"a{x}+"},
]


def _compiles(make) -> bool:
    try:
        make()
    except (RuntimeError, ValueError):
        return False
    return True


@pytest.mark.parametrize("regex, compiles", REGEXES)
def test_regex_verdicts_agree(regex, compiles):
    assert _compiles(lambda: xgr.Grammar.from_regex(regex)) is compiles    # the premise
    problem = check_structured_outputs({"regex": regex})
    assert (problem is None) is compiles, problem


@pytest.mark.parametrize("pattern, compiles", PATTERNS)
def test_schema_pattern_verdicts_agree(pattern, compiles):
    schema = {"type": "string", "pattern": pattern}
    assert _compiles(lambda: xgr.Grammar.from_json_schema(json.dumps(schema))) is compiles
    problem = check_structured_outputs({"json": schema})
    assert (problem is None) is compiles, problem


@pytest.mark.parametrize("grammar, compiles", GRAMMARS)
def test_grammar_verdicts_agree(grammar, compiles):
    assert _compiles(lambda: xgr.Grammar.from_ebnf(grammar)) is compiles
    problem = check_structured_outputs({"grammar": grammar})
    assert (problem is None) is compiles, problem


@pytest.mark.parametrize("schema, compiles", NUMBERS)
def test_number_range_verdicts_agree(schema, compiles):
    assert _compiles(lambda: xgr.Grammar.from_json_schema(json.dumps(schema))) is compiles
    problem = check_structured_outputs({"json": schema})
    assert (problem is None) is compiles, problem


def test_messages_say_what_to_write():
    assert check_structured_outputs({"grammar": 'root ::= "(" num ")"\nnums ::= [0-9]+'}) == (
        "structured_outputs.grammar uses rule 'num' (line 1), which is not defined: add "
        "`num ::= ...`")
    assert "join the alternatives with | in one rule" in check_structured_outputs(
        {"grammar": 'root ::= "a"\nroot ::= "b"'})
    assert check_structured_outputs({"regex": "a{,3}"}) == (
        "structured_outputs.regex uses {,n}, which xgrammar does not read: write {0,n}")
    assert "escape it as \\]" in check_structured_outputs({"regex": "[]a]"})
    assert "(?:...)" in check_structured_outputs({"regex": "(?i)abc"})
    assert check_structured_outputs({"json": {"type": "integer", "minimum": 2,
                                              "exclusiveMaximum": 2}}) == (
        "structured_outputs.json allows no number (minimum 2, exclusiveMaximum 2): widen "
        "the range")


@pytest.mark.parametrize("constraint", LEFT_TO_THE_WORKER)
def test_what_the_login_checks_leave_to_the_worker(constraint):
    from hpcinfer.engine.structured_params import StructuredOutputsParams
    assert check_structured_outputs(constraint) is None
    params = StructuredOutputsParams(**constraint)
    kind = params.kind
    make = {"grammar": lambda: xgr.Grammar.from_ebnf(params.grammar),
            "regex": lambda: xgr.Grammar.from_regex(params.regex),
            "json": lambda: xgr.Grammar.from_json_schema(json.dumps(params.json))}[kind]
    assert not _compiles(make)
