"""JSON Schema export, the generated reference doc, `init` files, and the login-side import cost."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hpcinfer.config import ConfigError, init_text, json_schema, list_profiles, load_job
from hpcinfer.config.docs import reference_markdown
from hpcinfer.config.schema import SECTION_MODELS, JobConfig

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "config-reference.md"


def _resolve(schema: dict, node: dict) -> dict:
    ref = node.get("$ref")
    if ref is None:
        for option in node.get("anyOf", []):
            if "$ref" in option:
                return _resolve(schema, option)
        return node
    assert ref.startswith("#/$defs/"), ref
    return schema["$defs"][ref.split("/")[-1]]


def _property_paths(schema: dict) -> list[str]:
    """Doc-style key paths: `name` at the top, `model.id` inside a section."""
    paths = []
    for key, node in schema["properties"].items():
        if key in SECTION_MODELS:
            paths += [f"{key}.{sub}" for sub in _resolve(schema, node)["properties"]]
        else:
            paths.append(key)
    return paths


def test_json_schema_structure():
    schema = json_schema()
    json.dumps(schema)  # serialisable
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert list(schema["properties"]) == list(JobConfig.model_fields)
    assert set(schema["required"]) == {"name", "model", "input"}
    for name, model in SECTION_MODELS.items():
        node = _resolve(schema, schema["properties"][name])
        assert node["type"] == "object" and node["additionalProperties"] is False, name
        assert list(node["properties"]) == list(model.model_fields), name
    # Every $ref resolves.
    for ref in _all_refs(schema):
        assert ref.split("/")[-1] in schema["$defs"], ref
    resources = _resolve(schema, schema["properties"]["resources"])["properties"]
    assert {"type": "integer", "minimum": 1} in resources["time"]["anyOf"]
    assert resources["device"]["enum"] == ["cuda", "cpu"]


def _all_refs(node):
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for value in node.values():
            yield from _all_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _all_refs(value)


def test_reference_doc_is_current():
    expected = reference_markdown()
    assert DOC.read_text() == expected, (
        "docs/config-reference.md is stale: run "
        "`python -m hpcinfer.config.docs > docs/config-reference.md`")


def test_reference_doc_covers_every_schema_key():
    doc = DOC.read_text()
    paths = _property_paths(json_schema())
    assert "resources.time" in paths and "name" in paths
    for path in paths:
        assert f"| `{path}` |" in doc, f"{path} is in the JSON Schema but not in the reference"


@pytest.mark.parametrize("cluster", ["generic", "aau-ai-cloud", "alliance-canada"])
def test_init_text_loads_and_comments_every_key(tmp_path, cluster, monkeypatch):
    assert cluster in list_profiles()
    text = init_text(cluster)
    path = tmp_path / "job.yaml"
    path.write_text(text)
    yaml.safe_load(text)
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert " # " in line, f"init line without a comment: {line!r}"
    monkeypatch.delenv("SBATCH_ACCOUNT", raising=False)
    monkeypatch.delenv("SLURM_ACCOUNT", raising=False)
    # As written, the CHANGE-ME placeholders are errors that say what to write ...
    placeholders = ["model.id", "input.path"] + (["resources.account"]
                                                  if cluster == "alliance-canada" else [])
    overrides = []
    for key in placeholders:
        with pytest.raises(ConfigError) as info:
            load_job(path, overrides)
        assert info.value.key_path == key and "placeholder from `hpcinfer init`" in \
            info.value.problem and info.value.fix.startswith("write ")
        assert f"CHANGE ME. " in text.splitlines()[info.value.line - 1]
        overrides.append({"model.id": "org/model", "input.path": "data/*.jsonl",
                          "resources.account": "def-someone"}[key])
        overrides[-1] = f"{key}={overrides[-1]}"
    if cluster == "aau-ai-cloud":  # the profile's image lives on the cluster, not here
        image = tmp_path / "vllm-openai_latest.sif"
        image.write_text("sif")
        overrides.append(f"container.image={image}")
    # ... and once they are filled in, the file loads.
    cfg = load_job(path, overrides)
    assert cfg.cluster == cluster and cfg.name == "my-job"
    assert cfg.profile == load_job(path, overrides).profile
    for key in JobConfig.model_fields:
        assert f"\n{key}:" in "\n" + text, key


def test_init_for_an_unknown_cluster_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        init_text("alliance")
    assert "did you mean 'alliance-canada'?" in info.value.fix


def test_login_side_import_pulls_in_nothing_heavy(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("name: t\nmodel: {id: org/m}\ninput: {path: x.jsonl}\n")
    code = (
        "import sys, hpcinfer.config as c\n"
        f"cfg = c.load_job({str(job)!r}); cfg.to_yaml(); c.json_schema(); c.init_text('generic')\n"
        "from hpcinfer.config.docs import reference_markdown; reference_markdown()\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch', 'transformers', 'triton', 'pyarrow', 'numpy'})\n"
        "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout.strip() == "", f"login side imported: {out.stdout.strip()}"
