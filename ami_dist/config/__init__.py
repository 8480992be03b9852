"""Run configs: load a YAML file plus dotted overrides into the typed tree of :mod:`.schema`."""

from __future__ import annotations

from pathlib import Path

import yaml

from ami_dist.config.loader import apply_overrides, load_yaml
from ami_dist.config.schema import CHECK_FILES, SCHEMA_VERSION, Config
from ami_dist.typed_config import build, flatten, to_dict

__all__ = ["SCHEMA_VERSION", "Config", "flatten", "load_config", "save_config", "to_dict"]


def load_config(path: str | Path, overrides: list[str] | None = None, check_files: bool = True) -> Config:
    """Load and validate a run config; a mistake raises ConfigError naming file, line and key.
    ``check_files=False`` leaves out whether the corpus and vocabulary files it names exist."""
    data, loc = load_yaml(path)
    apply_overrides(data, list(overrides or []), loc)
    token = CHECK_FILES.set(check_files)
    try:
        return build(Config, data, loc)
    finally:
        CHECK_FILES.reset(token)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
