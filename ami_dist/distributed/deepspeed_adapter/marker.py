"""The mark every function the adapter puts in DeepSpeed's place carries, and a scan for it."""

from __future__ import annotations

import inspect
import sys
from typing import Any, TypeVar

MARKER = "ami_dist_patched"
F = TypeVar("F")


def mark(fn: F) -> F:
    setattr(fn, MARKER, True)
    return fn


def is_marked(value: Any) -> bool:
    try:
        return getattr(value, MARKER, False) is True
    except Exception:  # an object whose __getattr__ raises something else (a lazy module, a proxy)
        return False


def patched_attributes(*objects: Any) -> list[str]:
    """Every attribute that carries the mark: of DeepSpeed's imported modules and their classes, and of
    ``objects`` (an engine's optimizer, say), as ``module.Class.name`` strings."""
    found = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "deepspeed" or name.startswith("deepspeed.")):
            continue
        for attr, value in list(vars(module).items()):
            if is_marked(value):
                found.append(f"{name}.{attr}")
            elif inspect.isclass(value) and value.__module__ == name:
                found.extend(f"{name}.{attr}.{a}" for a, v in vars(value).items() if is_marked(v))
    for obj in objects:
        found.extend(f"{type(obj).__name__}().{a}" for a, v in vars(obj).items() if is_marked(v))
    return sorted(set(found))
