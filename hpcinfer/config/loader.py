"""load_job / load_resolved: YAML files -> a validated, frozen, path-resolved JobConfig.

Layers, lowest first: cluster profile < job file < ``--set`` overrides. Every value remembers
the file:line it came from (``origins``), so an error found at any stage (pydantic, the
consistency checks, the compiler's input scan) points at the line that set it.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from hpcinfer.config import checks
from hpcinfer.config.errors import ConfigError
from hpcinfer.config.overrides import check_not_into_scalar, overrides_as_layer
from hpcinfer.config.paths import resolve_paths
from hpcinfer.config.structured import inline_schema_file
from hpcinfer.config.profiles import read_profile
from hpcinfer.config.schema import ClusterProfile, JobConfig
from hpcinfer.config.translate import first_error
from hpcinfer.config.yamlfile import MAX_YAML_BYTES, Origins, locate, merge, read_yaml

__all__ = ["load_job", "load_resolved", "dump_resolved", "locate"]

RESOLVED_NAME = "job.yaml"


def _read_mapping(path: Path, label: str) -> tuple[dict, Origins]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_YAML_BYTES + 1)     # enough to tell "too big" without reading it all
    except FileNotFoundError:
        raise ConfigError(label, None, "", "file not found",
                          "check the path, or start one with `hpcinfer init > job.yaml`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(label, None, "", f"cannot read the file ({exc})",
                          "check its permissions and that it is UTF-8 text") from None
    data, origins = read_yaml(text, label)
    if data is None:
        raise ConfigError(label, None, "", "the file is empty",
                          "start from `hpcinfer init --cluster generic`")
    if not isinstance(data, dict):
        raise ConfigError(label, 1, "", f"a job file must be a mapping of keys, got "
                          f"{type(data).__name__}", "start from `hpcinfer init`")
    return data, origins


def load_job(path: str | Path, overrides: Sequence[str] = (), *,
             check_environment: bool = True) -> JobConfig:
    """Parse ``path``, merge its cluster profile underneath and ``overrides`` on top, validate,
    make paths absolute (relative ones are relative to the job file's directory, --set values
    included), run the consistency checks and, unless told not to, the environment checks
    (output dir writable, container image present, account given where required).

    Raises ConfigError (one line: ``file:line: key.path: problem; fix``).
    """
    label = str(path)
    source = Path(path).expanduser().absolute()
    data, origins = _job_file_and_overrides(source, label, overrides)
    cluster = data.get("cluster", "generic")
    where = locate(origins, "cluster", label)
    if not isinstance(cluster, str) or not cluster:
        raise ConfigError(where[0], where[1], "cluster", f"expected a profile name, got "
                          f"{cluster!r}", "write e.g. `cluster: generic`")
    profile_data, profile_origins, profile_label, profile_path = read_profile(
        cluster, source.parent, where)
    slurm_raw = profile_data.pop("slurm", None) or {}
    profile_data.pop("description", None)
    data, origins = merge(profile_data, profile_origins, data, origins)

    profile = _validate_profile(slurm_raw, profile_origins, profile_label)
    data = _fill_container_runtime(data, origins, profile, profile_origins)
    cfg = _validate_job(data, origins, label)
    _attach(cfg, origins, str(source), profile, profile_path, tuple(overrides))
    cfg = resolve_paths(cfg, source.parent)
    cfg = inline_schema_file(cfg, source.parent)
    checks.check_consistency(cfg)
    if check_environment:
        checks.check_environment(cfg)
    return cfg


def _job_file_and_overrides(source: Path, label: str, overrides: Sequence[str]
                            ) -> tuple[dict, Origins]:
    """The job file with the --set layer merged on top (no profile yet)."""
    data, origins = _read_mapping(source, label)
    if "slurm" in data:
        raise ConfigError(label, origins["slurm"][1], "slurm",
                          "the slurm: block belongs to the cluster profile, not the job file",
                          "copy configs/clusters/<name>.yaml, edit it, and set "
                          "`cluster: ./my-cluster.yaml`")
    layer, layer_origins = overrides_as_layer(overrides)
    if "slurm" in layer:
        raise ConfigError(layer_origins["slurm"][0], None, "slurm",
                          "slurm.* comes from the cluster profile and cannot be overridden",
                          "use a profile file of your own: --set cluster=./my-cluster.yaml")
    check_not_into_scalar(data, layer, layer_origins)
    return merge(data, origins, layer, layer_origins)


def load_resolved(path: str | Path) -> JobConfig:
    """Read a job directory's fully resolved job.yaml (``path`` is the dir or the file).

    No profile merge, no path resolution, no environment checks: the file is what the login
    side resolved, and the worker must run exactly that.
    """
    source = Path(path).expanduser().absolute()
    if source.is_dir():
        source = source / RESOLVED_NAME
    label = str(source)
    data, origins = _read_mapping(source, label)
    slurm_raw = data.pop("slurm", None)
    if not isinstance(slurm_raw, dict):
        raise ConfigError(label, None, "slurm", "a resolved job.yaml must have a slurm: block",
                          "render the job again with `hpcinfer render JOB.yaml`")
    profile = _validate_profile(slurm_raw, origins, label)
    cfg = _validate_job(data, origins, label)
    _attach(cfg, origins, str(source), profile, None, ())
    checks.check_consistency(cfg)
    return cfg


def _validate_profile(raw: Any, origins: Origins, label: str) -> ClusterProfile:
    try:
        return ClusterProfile.model_validate(raw)
    except ValidationError as exc:
        raise first_error(exc, raw, origins, label, ClusterProfile, prefix="slurm") from None


def _validate_job(data: dict, origins: Origins, label: str) -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        raise first_error(exc, data, origins, label, JobConfig) from None


def _fill_container_runtime(data: dict, origins: Origins, profile: ClusterProfile,
                            profile_origins: Origins) -> dict:
    # `runtime: null` means "the profile's"; write it in so the resolved file is explicit.
    container = data.get("container")
    if not isinstance(container, dict) or container.get("runtime") is not None:
        return data
    if "slurm.container_runtime" in profile_origins:
        origins["container.runtime"] = profile_origins["slurm.container_runtime"]
    return {**data, "container": {**container, "runtime": profile.container_runtime}}


def _attach(cfg: JobConfig, origins: Origins, source: str, profile: ClusterProfile,
            profile_path: str | None, overrides: tuple[str, ...]) -> None:
    cfg._origins = origins
    cfg._source = source
    cfg._profile = profile
    cfg._profile_source = profile_path
    cfg._overrides = overrides


def _one_line(value) -> str:
    # A newline (or other control character) in a path would end the comment line and turn
    # the rest into YAML; escape them the way Python's repr does.
    text = str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def dump_resolved(cfg: JobConfig) -> str:
    """The resolved job.yaml text: a comment header, the job keys in schema order, then the
    profile's slurm block. Deterministic (no timestamps) so it can be golden-tested."""
    from hpcinfer import __version__
    header = [
        f"# Fully resolved by hpcinfer {__version__}: cluster profile < job file < --set.",
        f"# Job file: {_one_line(cfg.source_file)}",
        f"# Cluster profile: {_one_line(cfg.cluster)} "
        f"({_one_line(cfg.profile_file or 'as recorded below')})",
    ]
    header += [f"# Override: --set {_one_line(text)}" for text in cfg.overrides]
    header.append("# The worker reads this file. To change the job, edit the job file and "
                  "render again.")
    body = cfg.model_dump(mode="json")
    body["slurm"] = cfg.profile.model_dump(mode="json")
    text = yaml.safe_dump(body, sort_keys=False, default_flow_style=False, allow_unicode=True,
                          width=100)
    return "\n".join(header) + "\n" + text
