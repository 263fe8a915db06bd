"""YAML job files -> validated, typed, frozen config (login side: pyyaml + pydantic only).

Public API::

    load_job(path, overrides=(), *, check_environment=True) -> JobConfig
    load_resolved(job_dir_or_yaml) -> JobConfig
    JobConfig.to_yaml(), .profile, .location_of(key), .error_at(key, problem, fix)
    ConfigError(file, line, key_path, problem, fix)
    json_schema() -> dict; init_text(cluster) -> str; list_profiles() -> list[str]
"""
from __future__ import annotations

from hpcinfer.config.errors import ConfigError
from hpcinfer.config.loader import load_job, load_resolved
from hpcinfer.config.profiles import list_profiles
from hpcinfer.config.schema import ClusterProfile, JobConfig
from hpcinfer.config.vllm_configs import AttentionConfig  # vLLM's vllm.config path


def json_schema() -> dict:
    """JSON Schema (draft 2020-12) of a job file, for editors and `hpcinfer schema`."""
    from hpcinfer.config.schema_export import job_json_schema
    return job_json_schema()


def init_text(cluster: str = "generic") -> str:
    """An annotated starting job file for ``cluster`` (valid YAML that loads)."""
    from hpcinfer.config.init import init_text as _init_text
    return _init_text(cluster)


__all__ = ["AttentionConfig", "ConfigError", "JobConfig", "ClusterProfile", "load_job", "load_resolved",
           "json_schema", "init_text", "list_profiles"]
