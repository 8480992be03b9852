"""Read YAML run configs (remembering the line of every key) and apply dotted command-line overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ami_dist.errors import ConfigError
from ami_dist.typed_config import Located


def _record_places(node: yaml.Node, path: str, source: str, places: dict[str, str]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = f"{path}.{key_node.value}" if path else str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:  # YAML loaders keep the last one silently; one of the two is a mistake
                raise ConfigError(f"{source}:{line}: {key}: duplicate key (also set at line {seen[key]})")
            seen[key] = line
            places[key] = f"{source}:{line}"
            _record_places(value_node, key, source, places)


def load_yaml(path: str | Path) -> tuple[dict[str, Any], Located]:
    """Parse a YAML mapping from ``path``; every problem is a :class:`ConfigError` naming the file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a directory, expected a YAML config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: not valid UTF-8 (byte {e.start})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and context_mark is not None and (mark is None or context_mark.line != mark.line):
            problem += f" ({context} that starts at line {context_mark.line + 1})"
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        where = f"{source}:{node.start_mark.line + 1}" if node is not None else source
        found = {list: "a list", str: "a string"}.get(type(data), f"the value {data!r}")
        raise ConfigError(f"{where}: expected a mapping of config keys (section: ...) at the top level, "
                          f"found {found}")
    places: dict[str, str] = {}
    if node is not None:
        _record_places(node, "", source, places)
    return data, Located(source, places)


def apply_overrides(data: dict[str, Any], overrides: list[str], loc: Located) -> None:
    """Apply ``a.b.c=value`` overrides in place; values are parsed as YAML scalars (``1e-3``, ``true``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"command line: override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        target = data
        for depth, part in enumerate(parts[:-1]):
            child = target.setdefault(part, {})
            if not isinstance(child, dict):
                prefix = ".".join(parts[: depth + 1])
                raise ConfigError(f"command line: {key}: {prefix} is a value, not a section")
            target = child
        target[parts[-1]] = value
        loc.places[key] = "command line"
