"""`hpcinfer init --cluster NAME`: an annotated starting job file, generated from the schema.

Every key appears with its effective default (the cluster profile's where it sets one) and its
description as a comment, so the file documents itself and stays in step with the schema. The
output is valid YAML that ``load_job`` accepts once the placeholders point at real things.
"""
from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from hpcinfer.config.profiles import profile_description, read_profile
from hpcinfer.config.schema import JobConfig, Section
from hpcinfer.config.yamlfile import merge

COMMENT_COLUMN = 44
# Placeholders for keys with no usable default. They say CHANGE-ME so that `hpcinfer validate`
# refuses them (config/checks.py: PLACEHOLDER) with what to write, instead of a job that
# queues and then fails on a model or an account that does not exist.
PLACEHOLDERS = {
    "name": "my-job",
    "model": {"id": "CHANGE-ME"},
    "input": {"path": "CHANGE-ME/*.jsonl"},
}
ACCOUNT_PLACEHOLDER = "CHANGE-ME"
_CHANGE = {"model.id", "input.path", "resources.account"}


def init_text(cluster: str = "generic") -> str:
    """Annotated job file for ``cluster``; raises ConfigError for an unknown profile."""
    values = _effective_defaults(cluster)
    description = profile_description(cluster)
    lines = [
        f"# hpcinfer job file for cluster {cluster!r} (made by `hpcinfer init`).",
        *[f"#   {part}" for part in _wrap(description, 90)],
        "# Values shown are the defaults (the cluster profile's where it sets one): delete any",
        "# line you do not need. Lines marked CHANGE ME are placeholders: validate refuses",
        "# them until they hold your values.",
        "# Check with `hpcinfer validate job.yaml`; every key: docs/config-reference.md",
        "",
    ]
    lines += _emit_model(JobConfig, values, "", 0)
    return "\n".join(lines) + "\n"


def _effective_defaults(cluster: str) -> dict:
    data, origins, _, _ = read_profile(cluster, Path("."), ("init", None))
    slurm = data.pop("slurm", {}) or {}
    data.pop("description", None)
    raw, _ = merge(PLACEHOLDERS | {"cluster": cluster}, {}, data, origins)
    if (slurm.get("requires_account") and not raw.get("resources", {}).get("account")):
        raw, _ = merge(raw, {}, {"resources": {"account": ACCOUNT_PLACEHOLDER}}, {})
    if isinstance(raw.get("container"), dict):
        runtime = slurm.get("container_runtime", "apptainer")
        raw["container"] = {"runtime": runtime, **raw["container"]}
    return JobConfig.model_validate(raw).model_dump(mode="json")


def _emit_model(model: type[BaseModel], values: dict, prefix: str, depth: int) -> list[str]:
    lines = []
    indent = "  " * depth
    for key, field in model.model_fields.items():
        path = f"{prefix}.{key}" if prefix else key
        comment = _comment(field, path)
        value = values.get(key)
        sub = _section_model(field.annotation)
        if sub is not None and isinstance(value, dict):
            lines.append(_with_comment(f"{indent}{key}:", comment))
            lines += _emit_model(sub, value, path, depth + 1)
        elif sub is not None:  # a section that is off (container: null): show how to turn it on
            lines.append(_with_comment(f"{indent}{key}: null", comment + "; to use one, "
                                       "replace null with an indented block of:"))
            lines += [f"{indent}#   {k}: ...  # {f.description}"
                      for k, f in sub.model_fields.items()]
        else:
            lines.append(_with_comment(f"{indent}{key}: {_flow(value)}", comment))
    return lines


def _comment(field: Any, path: str) -> str:
    text = field.description or ""
    options = _literal_options(field.annotation)
    if options and "one of" not in text:
        text += f" (one of: {' | '.join(str(o) for o in options)})"
    if path in _CHANGE:
        text = "CHANGE ME. " + text
    return text


def _with_comment(code: str, comment: str) -> str:
    return f"{code.ljust(COMMENT_COLUMN - 1)} # {comment}" if comment else code


def _flow(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-4].strip() if text.endswith("\n...") or text.endswith(" ...") else text


def _section_model(annotation: Any) -> type[Section] | None:
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_model(arg)
        if found is not None:
            return found
    return None


def _literal_options(annotation: Any) -> tuple:
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    for arg in typing.get_args(annotation):
        found = _literal_options(arg)
        if found:
            return found
    return ()


def _wrap(text: str, width: int) -> list[str]:
    import textwrap
    return textwrap.wrap(text, width) if text else []
