"""Every change ami-dist makes to DeepSpeed's internals; nothing else in the tree makes one.

Stock DeepSpeed is written for GPUs; on CPU over gloo some of what it does costs time and memory for
nothing (README "What ami-dist changes in DeepSpeed", each change measured). Two parts:

- ``imports``: what DeepSpeed does as it is imported (MLflow, its shared-memory inference op, Muon's
  compilation);
- ``zero_cpu``: ZeRO-1/2's collectives through shared memory, flat weights shared between the ranks of a
  machine, the float32 master copy, the gradient norm, gradients released as they are flattened;
- ``zero3_gradients``: ZeRO-3's gradient partitions held only from a backward pass to the end of its step.

They apply only when all of these hold: the backend is gloo (:func:`import_deepspeed` is told it after the
backend is chosen), the installed DeepSpeed is one of :data:`SUPPORTED_VERSIONS` (any other runs stock,
with one warning), and the run config's ``distributed.deepspeed_adapter`` is true. Under NCCL nothing of
DeepSpeed is replaced. Every replaced function carries the mark :data:`MARKER` (see :func:`patched_attributes`).

One change applies on every backend, because DeepSpeed has no setter for it: :func:`set_gradient_clipping`
(AMI's adversarial steps clip differently from the MLE steps of the same network).
"""

from __future__ import annotations

import importlib.metadata
import warnings
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from ami_dist.distributed.deepspeed_adapter.imports import (
    import_muon_lazily,
    import_without_mlflow,
    skip_inference_shm_op,
)
from ami_dist.distributed.deepspeed_adapter.marker import MARKER, patched_attributes
from ami_dist.distributed.deepspeed_adapter.zero3_gradients import hold_gradients_for_the_step
from ami_dist.distributed.deepspeed_adapter.zero_cpu import (
    adapt_zero_optimizer,
    install_zero_cpu,
    return_large_frees_to_the_system,
)

__all__ = ["MARKER", "SUPPORTED_VERSIONS", "adapt_engine", "adapt_zero3_construction", "adapter_params",
           "import_deepspeed", "patched_attributes", "set_gradient_clipping", "state"]

# The DeepSpeed releases whose internals the adaptations were written against and tested with.
SUPPORTED_VERSIONS = ("0.19.8",)


@dataclass
class AdapterState:
    """What the first :func:`import_deepspeed` of this process decided, and what was applied since."""

    decided: bool = False
    backend: str = ""
    version: str = ""
    active: bool = False  # the adaptations are in force
    reason: str = ""  # why not, where they are not
    applied: list[str] = field(default_factory=list)  # at import and in DeepSpeed's classes
    applied_to_engines: list[str] = field(default_factory=list)  # per engine, in the order first applied


state = AdapterState()


def installed_version() -> str:
    try:
        return importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def import_deepspeed(backend: str, enabled: bool = True, version: str | None = None) -> ModuleType:
    """DeepSpeed, adapted where ``backend`` is gloo (see the module's docstring); the first call of a process
    decides, later ones return the module as it is. ``version`` stands for the installed one (for tests)."""
    if state.decided:
        import deepspeed

        return deepspeed
    state.decided, state.backend = True, backend
    state.version = installed_version() if version is None else version
    if not enabled:
        state.reason = "off: distributed.deepspeed_adapter is false"
    elif backend != "gloo":
        state.reason = f"off: stock DeepSpeed on {backend}"
    elif state.version not in SUPPORTED_VERSIONS:
        state.reason = f"off: DeepSpeed {state.version} is not among {', '.join(SUPPORTED_VERSIONS)}"
        warnings.warn(f"DeepSpeed {state.version}: ami-dist's CPU adaptations of DeepSpeed are written for "
                      f"{', '.join(SUPPORTED_VERSIONS)}, so this run uses stock DeepSpeed (correct, slower and "
                      "larger on CPU; see the README's 'What ami-dist changes in DeepSpeed')", stacklevel=2)
    if state.reason:
        import deepspeed

        return deepspeed
    deepspeed, fresh = import_without_mlflow()
    if fresh:
        state.applied.append("mlflow_hidden_at_import")
    if import_muon_lazily():
        state.applied.append("lazy_muon_compile")
    if skip_inference_shm_op():
        state.applied.append("no_inference_shm_op")
    state.applied.extend(install_zero_cpu())
    state.active = True
    return deepspeed


def adapt_engine(engine: Any) -> list[str]:
    """The per-engine adaptations (ZeRO-1/2 with float32 weights, ZeRO-3's gradients, on CPU), where the
    adapter is in force; the names of those applied. A collective: every rank of the engine calls it."""
    if not state.active or any(p.device.type != "cpu" for p in engine.module.parameters()):
        return []
    applied = adapt_zero_optimizer(engine.optimizer)
    if hold_gradients_for_the_step(engine.optimizer):
        applied.append("stage3_gradients_for_the_step")
    state.applied_to_engines.extend(a for a in applied if a not in state.applied_to_engines)
    return applied


def adapt_zero3_construction() -> list[str]:
    """Before a ZeRO-3 network is built, where the adapter is in force: large frees go back to the system
    (zero_cpu.return_large_frees_to_the_system); the names of what applied."""
    if not state.active or "mmap_large_allocations" in state.applied_to_engines:
        return []
    if not return_large_frees_to_the_system():
        return []
    state.applied_to_engines.append("mmap_large_allocations")
    return ["mmap_large_allocations"]


def adapter_params() -> dict[str, str]:
    """For the run's MLflow params: the DeepSpeed version and which adaptations applied (or why none)."""
    applied = state.applied + state.applied_to_engines
    return {"deepspeed_version": state.version or installed_version(),
            "deepspeed_adapter": ",".join(applied) if state.active else state.reason or "off: not imported"}


def set_gradient_clipping(engine: Any, max_norm: float) -> None:
    """Clip ``engine``'s gradients to ``max_norm`` (0: not at all) from its next step on, on every backend.
    DeepSpeed reads the value from its config (and, under ZeRO, from the optimizer's ``clip_grad``)."""
    engine._config.gradient_clipping = max_norm
    if hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = max_norm
