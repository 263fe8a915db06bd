"""``--set key.path=value`` overrides: YAML-typed values layered over the job file."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

from hpcinfer.config.errors import ConfigError
from hpcinfer.config.yamlfile import Origins, parse_value

_FORM = 'write --set key.path=value, e.g. --set resources.time=04:00:00'


def override_label(text: str) -> str:
    """How an override is named in error messages (its ``file``)."""
    return f"--set {text}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """"a.b=value" -> (["a", "b"], YAML-typed value). Raises ConfigError on a malformed one."""
    label = override_label(text)
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(label, None, "", f"--set expects KEY=VALUE, got {text!r}", _FORM)
    parts = key.split(".")
    if any(not part.strip() for part in parts):
        raise ConfigError(label, None, key, "empty part in the key path", _FORM)
    if any(part.isdigit() for part in parts):
        raise ConfigError(label, None, key, "list items cannot be set one by one",
                          f"set the whole list, e.g. --set {'.'.join(parts[:-1])}=[a, b]")
    try:
        value = parse_value(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(label, None, key, f"value {raw!r} is not valid YAML ({problem})",
                          f"quote it: --set '{key}=\"...\"'") from None
    return parts, value


def overrides_as_layer(overrides: Sequence[str]) -> tuple[dict, Origins]:
    """All overrides as one nested mapping (later ones win) plus their origins."""
    layer: dict = {}
    origins: Origins = {}
    for text in overrides:
        parts, value = parse_override(text)
        label = override_label(text)
        node = layer
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None or not isinstance(child, dict):
                if child is not None:
                    _conflict(text, parts[:depth + 1])
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
        path = ".".join(parts)
        for stale in [p for p in origins if p == path or p.startswith(path + ".")]:
            del origins[stale]
        for depth in range(1, len(parts) + 1):
            origins.setdefault(".".join(parts[:depth]), (label, None))
        origins[path] = (label, None)
        _note_items(value, path, label, origins)
    return layer, origins


def _note_items(value: Any, path: str, label: str, origins: Origins) -> None:
    # Errors inside a --set value (e.g. --set sampling={tempreature: 1}) point at the --set.
    items = value.items() if isinstance(value, dict) else (
        enumerate(value) if isinstance(value, list) else ())
    for key, item in items:
        origins[f"{path}.{key}"] = (label, None)
        _note_items(item, f"{path}.{key}", label, origins)


def _conflict(text: str, parts: list[str]) -> None:
    where = ".".join(parts)
    raise ConfigError(override_label(text), None, where,
                      f"an earlier --set gave {where} a plain value, so it has no keys",
                      "drop one of the two overrides")


def check_not_into_scalar(base: dict, layer: dict, origins: Origins, prefix: str = "") -> None:
    """Refuse ``--set name.x=1`` where ``name`` is a plain value in the file."""
    for key, value in layer.items():
        path = f"{prefix}.{key}" if prefix else key
        if not isinstance(value, dict) or key not in base:
            continue
        existing = base[key]
        if isinstance(existing, dict):
            check_not_into_scalar(existing, value, origins, path)
        elif existing is not None:
            label = origins.get(path, ("--set", None))[0]
            raise ConfigError(label, None, path,
                              f"{path} is a plain value ({existing!r}), not a block with keys",
                              f"set it directly: --set {path}=...")
