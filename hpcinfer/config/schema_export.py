"""The job-file JSON Schema, exported for editors (yaml-language-server) and the docs."""
from __future__ import annotations

from hpcinfer.config.schema import JobConfig

SCHEMA_ID = "https://hpcinfer.dev/schema/job.json"


def job_json_schema() -> dict:
    """JobConfig's validation schema with $schema/$id/title set (draft 2020-12)."""
    schema = JobConfig.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            "title": "hpcinfer job file", **{k: v for k, v in schema.items() if k != "title"}}
