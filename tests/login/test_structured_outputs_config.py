"""sampling.structured_outputs in job files, checked on the login side without xgrammar:
a schema file is read and inlined into the resolved job.yaml, broken constraints fail
`hpcinfer validate` at the right line, rows' constraints are checked when rows are read,
and OpenAI response_format maps onto the same constraint."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from hpcinfer.config import ConfigError, load_job
from hpcinfer.io import openai_batch
from hpcinfer.io.constraints import check_structured_outputs
from hpcinfer.io.sampling import check_sampling_overrides
from hpcinfer.testing.jobs import write_job

SCHEMA = {"type": "object", "properties": {"label": {"enum": ["a", "b"]}},
          "required": ["label"], "additionalProperties": False}


def _job(tmp_path, constraint, schema_text=None):
    if schema_text is not None:
        (tmp_path / "schemas").mkdir(parents=True, exist_ok=True)
        (tmp_path / "schemas" / "label.json").write_text(schema_text)
    return write_job(tmp_path, sampling={"max_tokens": 50, "structured_outputs": constraint})


def test_schema_file_is_inlined_in_the_resolved_job(tmp_path):
    job = _job(tmp_path, {"json": "schemas/label.json", "disable_any_whitespace": True},
               json.dumps(SCHEMA))
    cfg = load_job(job)
    assert cfg.sampling.structured_outputs == {"json": SCHEMA, "disable_any_whitespace": True}
    resolved = yaml.safe_load(cfg.to_yaml())
    assert resolved["sampling"]["structured_outputs"]["json"] == SCHEMA


@pytest.mark.parametrize("constraint", [
    {"json": SCHEMA}, {"json": json.dumps(SCHEMA)}, {"regex": "[a-z]{3}"},
    {"choice": ["yes", "no"]}, {"grammar": 'root ::= "a" | "b"'}, {"json_object": True}])
def test_every_kind_validates_inline(tmp_path, constraint):
    assert load_job(_job(tmp_path, constraint)).sampling.structured_outputs == constraint


@pytest.mark.parametrize("constraint, schema_text, words", [
    ({"json": "schemas/missing.json"}, None, "cannot read the schema file"),
    ({"json": "schemas/label.json"}, "{not json", "is not JSON"),
    ({"json": "schemas/label.json"}, '{"type": "strng"}', "did you mean 'string'"),
    ({"json": {"type": "array", "minItems": 3, "maxItems": 1}}, None,
     "minItems (3) is larger than maxItems (1)"),
    ({"json": {"properties": {"a": {"$ref": "#/$defs/Nope"}}}}, None, "points nowhere"),
    ({"json": {"properties": {"a": {"type": "string", "pattern": "(x"}}}}, None,
     "not a valid regular expression"),
    ({"regex": "(?<=a)b"}, None, "lookaround"),
    ({"grammar": 'start ::= "a"'}, None, "no root rule"),
    ({"choice": []}, None, "non-empty list"),
    ({"regex": "a", "choice": ["a"]}, None, "exactly one of"),
    ({"jsn": {}}, None, "did you mean 'json'"),
])
def test_broken_constraints_fail_at_load(tmp_path, constraint, schema_text, words):
    job = _job(tmp_path, constraint, schema_text)
    with pytest.raises(ConfigError) as info:
        load_job(job)
    err = info.value
    assert words in str(err), str(err)
    assert err.key_path.startswith("sampling.structured_outputs")
    assert err.line is not None  # points into job.yaml


def test_validate_cli_exit_codes_and_no_heavy_imports(tmp_path):
    """`hpcinfer validate` passes a good constraint, fails a broken one, and neither pulls in
    torch, transformers, triton or xgrammar."""
    good = _job(tmp_path / "good", {"json": "schemas/label.json"}, json.dumps(SCHEMA))
    bad = _job(tmp_path / "bad", {"regex": "(?=a)"})
    code = ("import sys, json\nfrom hpcinfer.cli import main\n"
            f"rcs = [main(['validate', {str(good)!r}]), main(['validate', {str(bad)!r}])]\n"
            "print(json.dumps([rcs, [m for m in ('torch', 'transformers', 'triton', "
            "'xgrammar') if m in sys.modules]]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path)
    rcs, heavy = json.loads(proc.stdout.splitlines()[-1])
    assert rcs == [0, 2], proc.stderr
    assert heavy == []
    assert "lookaround" in proc.stderr


# --- rows ---------------------------------------------------------------------------------
def test_row_constraint_checks():
    ok, problem = check_sampling_overrides({"structured_outputs": {"regex": "[0-9]+"}})
    assert problem is None and ok["structured_outputs"] == {"regex": "[0-9]+"}
    # a Parquet column may hold the constraint as JSON text
    ok, problem = check_sampling_overrides({"structured_outputs": '{"choice": ["x", "y"]}'})
    assert problem is None and ok["structured_outputs"] == {"choice": ["x", "y"]}
    _, problem = check_sampling_overrides({"structured_outputs": {"json": "{"}})
    assert problem.startswith("sampling.structured_outputs.json is not valid JSON")
    _, problem = check_sampling_overrides({"structured_outputs": {"regex": "a"},
                                           "min_tokens": 3})
    assert "min_tokens must be 0" in problem
    _, problem = check_sampling_overrides({"structured_outputs": "nope"})
    assert "must be an object" in problem


def test_schema_walk_reaches_nested_keywords():
    nested = {"type": "object", "properties": {"items": {"type": "array", "items": {
        "anyOf": [{"type": "integer"}, {"type": "object", "properties": {
            "x": {"type": "numbr"}}}]}}}}
    problem = check_structured_outputs({"json": nested})
    assert problem == ("structured_outputs.json.properties.items.items.anyOf[1].properties.x"
                       ".type 'numbr' is not a JSON schema type (did you mean 'number'?)")
    defs = {"$defs": {"P": {"type": "string"}}, "properties": {"p": {"$ref": "#/$defs/P"}}}
    assert check_structured_outputs({"json": defs}) is None


@pytest.mark.parametrize("body, expected", [
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "n", "schema": SCHEMA, "strict": True}}},
     {"json": SCHEMA}),
    ({"response_format": {"type": "json_object"}}, {"json_object": True}),
    ({"response_format": {"type": "text"}}, None),
    ({"structured_outputs": {"regex": "a+"}}, {"regex": "a+"}),
    ({"guided_choice": ["a", "b"]}, {"choice": ["a", "b"]}),
])
def test_openai_body_constraints(body, expected):
    obj = {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",
           "body": {"messages": [{"role": "user", "content": "hi"}], **body}}
    request, problem = openai_batch.parse_request(obj, "chat")
    assert problem is None
    assert request["sampling"].get("structured_outputs") == expected


@pytest.mark.parametrize("body, kind, words", [
    ({"response_format": {"type": "yaml"}}, "invalid_response_format", "must be text"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n"}}},
     "invalid_response_format", 'needs a "schema"'),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "invalid_sampling",
     "already has a structured-outputs constraint"),
])
def test_openai_body_constraint_problems(body, kind, words):
    obj = {"custom_id": "x", "method": "POST", "url": "/v1/completions",
           "body": {"prompt": "hi", **body}}
    _, problem = openai_batch.parse_request(obj, "generate")
    assert problem[0] == kind and words in problem[1]
