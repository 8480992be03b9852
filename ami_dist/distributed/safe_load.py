"""Load DeepSpeed checkpoints with ``weights_only=True``: a checkpoint file can hold data, never code.

DeepSpeed reads its own files with ``weights_only=False``, which runs whatever a pickle says; a
checkpoint copied from elsewhere could execute arbitrary code on load. Every engine gets a checkpoint
engine that refuses anything but tensors, containers, numbers, strings and the three plain DeepSpeed
classes its optimizer states hold.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from ami_dist.errors import UserError


def _deepspeed_globals() -> list[Any]:
    # Plain records DeepSpeed pickles into ZeRO optimizer states (an enum, a loss-scaler record and a
    # fragment address); allowing them lets nothing run but their own reconstruction.
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def safe_torch_load(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load(path, weights_only=True)`` with DeepSpeed's records allowed; refusals are UserErrors."""
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint file missing") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{path}: refused to load the checkpoint file ({first})") from None


def use_safe_loading(engine: Any) -> None:
    """Make ``engine.load_checkpoint`` read every file through :func:`safe_torch_load`."""
    checkpoint_engine = engine.checkpoint_engine

    def load(path: str, map_location: Any = None) -> Any:
        return safe_torch_load(path, map_location)

    checkpoint_engine.load = load
