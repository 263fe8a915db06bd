"""sampling.structured_outputs.json given as a schema file: read, checked and inlined at load.

The resolved job.yaml then carries the schema itself, so the worker reads nothing but the job
directory and a schema edited after submission cannot change a running job. The path is
relative to the job file; a file that is missing, not JSON or not a valid schema fails
``hpcinfer validate`` with the file and line of the ``json:`` key.
"""
from __future__ import annotations

import json
from pathlib import Path

from hpcinfer.config.schema import JobConfig
from hpcinfer.io.constraints import check_json_schema, looks_like_json_text

KEY = "sampling.structured_outputs.json"


def inline_schema_file(cfg: JobConfig, base: Path) -> JobConfig:
    constraint = cfg.sampling.structured_outputs
    path = (constraint or {}).get("json")
    if not isinstance(path, str) or looks_like_json_text(path):
        return cfg
    from hpcinfer.config.paths import _absolute
    file = Path(_absolute(base, cfg, KEY, path))
    try:
        schema = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise cfg.error_at(KEY, f"cannot read the schema file {file} ({exc.strerror})",
                           "give the path relative to the job file, or the schema inline")
    except ValueError as exc:
        raise cfg.error_at(KEY, f"the schema file {file} is not JSON ({exc})",
                           "fix the file (a JSON schema object)")
    problem = check_json_schema(schema, "schema")
    if problem:
        raise cfg.error_at(KEY, f"in the schema file {file}: {problem}", "fix the schema file")
    inlined = {**constraint, "json": schema}
    sampling = cfg.sampling.model_copy(update={"structured_outputs": inlined})
    return cfg.model_copy(update={"sampling": sampling})
