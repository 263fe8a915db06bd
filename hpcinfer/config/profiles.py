"""Cluster profiles: configs/clusters/<name>.yaml, shipped in the wheel as hpcinfer.configs.

A profile has the job file's sections as defaults (merged underneath the job file) plus a
``slurm:`` block of site facts the job file cannot set, and an optional ``description``.
``cluster:`` in a job file is a profile name or a path to a profile YAML (relative to the job
file), so a site can keep its own profile next to its jobs.
"""
from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

from hpcinfer.config.errors import ConfigError
from hpcinfer.config.yamlfile import Origins, read_yaml

# Keys of a profile file besides the job sections: both are popped before the merge.
PROFILE_ONLY_KEYS = ("slurm", "description")
_JOB_ONLY_KEYS = ("name", "cluster")


def _clusters_dir():
    return resources.files("hpcinfer.configs").joinpath("clusters")


def list_profiles() -> list[str]:
    """Names of the profiles shipped with hpcinfer, sorted."""
    return sorted(entry.name[:-5] for entry in _clusters_dir().iterdir()
                  if entry.name.endswith(".yaml"))


def _is_path(cluster: str) -> bool:
    return "/" in cluster or cluster.endswith((".yaml", ".yml")) or cluster.startswith("~")


def profile_source(cluster: str, base_dir: Path) -> tuple[str, str, str]:
    """(display label, absolute path, text) of a profile name or path; raises on unknown."""
    if _is_path(cluster):
        path = (base_dir / Path(cluster).expanduser()).resolve()
        if not path.is_file():
            raise FileNotFoundError(str(path))
        return str(path), str(path), path.read_text(encoding="utf-8")
    entry = _clusters_dir().joinpath(f"{cluster}.yaml")
    if not entry.is_file():
        raise KeyError(cluster)
    label = f"configs/clusters/{cluster}.yaml"
    return label, str(entry), entry.read_text(encoding="utf-8")


def unknown_profile_error(cluster: str, file: str, line: int | None) -> ConfigError:
    names = list_profiles()
    # "aau" -> "aau-ai-cloud": a prefix is as good a hint as a near-spelling.
    close = [n for n in names if n.startswith(cluster.lower())][:1] or \
        difflib.get_close_matches(cluster, names, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(file, line, "cluster", f"unknown cluster profile {cluster!r}",
                       f"{hint}available: {', '.join(names)}; or give a path to a profile "
                       f"YAML (cluster: ./my-cluster.yaml)")


def read_profile(cluster: str, base_dir: Path, where: tuple[str, int | None]
                 ) -> tuple[dict, Origins, str, str]:
    """The raw profile mapping (job-section defaults + slurm + description), its origins,
    its label for messages and its absolute path. ``where`` is the (file, line) of the ``cluster:`` key, for errors."""
    try:
        label, abs_path, text = profile_source(cluster, base_dir)
    except KeyError:
        raise unknown_profile_error(cluster, *where) from None
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError(where[0], where[1], "cluster",
                          f"cluster profile file {exc} does not exist or cannot be read",
                          f"fix the path, or use one of: {', '.join(list_profiles())}") from None
    data, origins = read_yaml(text, label)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(label, 1, "", "a cluster profile must be a mapping of keys",
                          "start from configs/clusters/generic.yaml")
    for key in _JOB_ONLY_KEYS:
        if key in data:
            raise ConfigError(label, origins[key][1], key,
                              f"a cluster profile cannot set {key!r}", "remove it")
    return data, origins, label, abs_path


def profile_description(cluster: str) -> str:
    """The ``description:`` of a shipped profile ('' if none)."""
    _, _, text = profile_source(cluster, Path("."))
    data, _ = read_yaml(text, cluster)
    return str((data or {}).get("description", "")).strip()
