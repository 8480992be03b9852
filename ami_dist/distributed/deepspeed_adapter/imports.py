"""What DeepSpeed does as it is imported, changed for ranks on CPU (applied by the adapter on gloo only).

- Its autotuner imports MLflow when installed: about 120 MB of resident memory in every rank (only
  rank 0 tracks, and it imports MLflow itself). Hidden from DeepSpeed's import.
- Its communication backend JIT-builds and loads a shared-memory all-reduce op for its inference
  path (training collectives go through torch.distributed), and every rank of a local launch then
  leaves a 69 MB segment in /dev/shm that nothing removes. Not built.
- Its ZeRO optimizers import its Muon optimizer, whose module applies ``@torch.compile`` to three
  functions as it is imported, which imports TorchDynamo, Inductor and networkx: about 600 modules and
  46 MB of resident memory in every rank, for an optimizer ami-dist never uses. Imported here with the
  compilation deferred to the first call.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from ami_dist.distributed.deepspeed_adapter.marker import mark

MUON_MODULE = "deepspeed.runtime.zero.muon.original_muon"


def import_without_mlflow() -> tuple[ModuleType, bool]:
    """``import deepspeed`` with MLflow hidden from it (where nothing has imported MLflow yet); returns the
    module and whether the import happened here (False: it was imported already, as it was)."""
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"], False
    block = "mlflow" not in sys.modules
    if block:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError
    try:
        import deepspeed
    finally:
        if block and sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
    return deepspeed, True


@mark
def _no_shm_op() -> None:
    return None


def skip_inference_shm_op() -> bool:
    """Make DeepSpeed's torch backend build no shared-memory inference op (before the backend starts)."""
    import deepspeed.comm.torch  # noqa: F401  (the attribute deepspeed.comm.torch is PyTorch itself)

    backend_module = sys.modules["deepspeed.comm.torch"]
    if not hasattr(backend_module, "build_shm_op"):
        return False
    backend_module.build_shm_op = _no_shm_op
    return True


def compile_on_first_call() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A ``@torch.compile`` decorator that compiles when the function first runs, not when it is defined."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        compiled: list[Callable[..., Any]] = []

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            if not compiled:
                compiled.append(torch.compile(fn))
            return compiled[0](*args, **kwargs)

        return mark(run)

    return decorate


def import_muon_lazily() -> bool:
    """Import DeepSpeed's Muon module with its ``@compiler.compile`` deferred; False where it was imported
    already (its functions compiled as DeepSpeed does) or does not exist in this DeepSpeed."""
    if MUON_MODULE in sys.modules:
        return False
    from deepspeed.runtime import compiler

    eager = compiler.compile
    compiler.compile = compile_on_first_call
    try:
        __import__(MUON_MODULE)
    except ImportError:
        return False
    finally:
        compiler.compile = eager
    return True
