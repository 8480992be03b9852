"""Load DeepSpeed checkpoints with ``weights_only=True``: a checkpoint file can hold data, never code.

DeepSpeed reads its own files with ``weights_only=False``, which runs whatever a pickle says; a
checkpoint copied from elsewhere could execute arbitrary code on load. Every engine gets a checkpoint
engine that refuses anything but tensors, containers, numbers, strings and the three plain DeepSpeed
classes its optimizer states hold; :func:`weights_only_loads` does the same for DeepSpeed's
``zero_to_fp32`` consolidation (used by ``ami-export``). A file that cannot be loaded (truncated,
not a checkpoint, or a pickle that would run code) is a :class:`UserError` naming the file.
"""

from __future__ import annotations

import re
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ami_dist.errors import UserError
from ami_dist.run_dir import RunDir


def _deepspeed_globals() -> list[Any]:
    # Plain records DeepSpeed pickles into ZeRO optimizer states (an enum, a loss-scaler record and a
    # fragment address); allowing them lets nothing run but their own reconstruction.
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def load_failure_reason(e: BaseException) -> str:
    """What is wrong with a file ``torch.load(..., weights_only=True)`` refused, in a few words."""
    text = str(e)
    refused = re.search(r"GLOBAL (\S+)", text)
    if refused:
        return (f"refused: unpickling it would call {refused.group(1)}, and a checkpoint may hold only tensors and "
                "plain data (an untrusted or foreign pickle)")
    if "central directory" in text or "zip archive" in text or isinstance(e, EOFError):
        return "truncated or corrupt: not a complete checkpoint archive"
    if "Weights only load failed" in text:
        detail = next((line.strip() for line in text.splitlines()[1:]
                       if line.strip() and not line.startswith(("Please file", "Check the documentation"))), "")
        return f"not a checkpoint file that loads with weights_only=True ({detail[:120]})"
    first = (text.strip().splitlines() or [""])[0][:160]
    return f"not a readable checkpoint file ({type(e).__name__}{': ' + first if first else ''})"


def safe_torch_load(path: str | Path, map_location: Any = None, *, mmap: bool | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` with DeepSpeed's records allowed; refusals are UserErrors."""
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol 4": the refusal says enough
            return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint file missing") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a checkpoint file") from None
    except Exception as e:  # the unpickler of a hostile or broken file may raise almost anything
        raise UserError(f"{path}: {load_failure_reason(e)}") from None


def use_safe_loading(engine: Any) -> None:
    """Make ``engine.load_checkpoint`` read every file through :func:`safe_torch_load`."""
    checkpoint_engine = engine.checkpoint_engine

    def load(path: str, map_location: Any = None) -> Any:
        return safe_torch_load(path, map_location)

    checkpoint_engine.load = load


class _WeightsOnlyTorch(types.SimpleNamespace):
    """``torch`` as a module sees it, except that ``torch.load`` is :func:`safe_torch_load`."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f: Any, map_location: Any = None, *, mmap: bool | None = None, **_ignored: Any) -> Any:
        # ``weights_only=False`` in the caller is dropped here: the file is read with weights_only=True.
        return safe_torch_load(f, map_location, mmap=mmap)


@contextmanager
def weights_only_loads(module: types.ModuleType) -> Iterator[None]:
    """Inside the block, ``module``'s calls of ``torch.load`` load with ``weights_only=True`` (UserError else).

    For DeepSpeed helpers such as ``deepspeed.utils.zero_to_fp32`` that call
    ``torch.load(..., weights_only=False)`` on files a user hands them.
    """
    original = module.torch
    module.torch = _WeightsOnlyTorch()
    try:
        yield
    finally:
        module.torch = original


def check_resumable(run_dir: str | Path, tag: str, cfg: Any) -> None:
    """Before a run continues (and before its ranks meet or its MLflow run is reopened): checkpoint ``tag``
    must load and must hold the model ``cfg`` describes; anything else is a UserError naming file or key.

    Every ``.pt`` file of the tag is unpickled with ``weights_only=True`` (memory-mapped, so only the
    pickles are read), which catches truncated files and pickles that would run code; ``model.*`` and
    ``vocab.*`` of ``cfg`` (the saved config plus overrides, or another ``--config``) must equal the
    run directory's saved config, the one its checkpoints were written with.
    """
    from ami_dist.config import flatten, load_config, to_dict
    from ami_dist.config.loader import load_yaml

    run_dir = Path(run_dir)
    saved_path = RunDir(run_dir).config
    saved = load_config(saved_path)
    _, located = load_yaml(saved_path)
    for section in ("model", "vocab"):
        before = flatten(to_dict(getattr(saved, section)), section)
        now = flatten(to_dict(getattr(cfg, section)), section)
        for key, value in before.items():
            if now.get(key) != value:
                raise UserError(f"{located.where(key)}: the checkpoints of {run_dir} hold a model with {key} = "
                                f"{value!r}, the config now asks for {now.get(key)!r} (a run continues with the "
                                "model it was saved with; start a new run to change it)")
    files = sorted(RunDir(run_dir).checkpoints.glob(f"*/{tag}/*.pt"))
    if not files:
        raise UserError(f"{run_dir / 'checkpoints' / 'latest'}: names checkpoint {tag}, which has no files "
                        "(deleted or moved?)")
    for path in files:
        state = safe_torch_load(path, "cpu", mmap=True)
        if path.name == "rank0.pt" and isinstance(state, dict) and "vocab_sha256" in state:
            _check_vocab(run_dir, cfg.vocab.kind, tag, state["vocab_sha256"])


def check_init_checkpoint(key: str, path: str | Path) -> None:
    """Before the ranks meet (and before a run directory exists): ``ami.<key>`` must be a network's DeepSpeed
    checkpoint directory whose newest checkpoint loads with ``weights_only=True``; else a UserError."""
    root = Path(path)
    latest = root / "latest"
    if not latest.is_file():
        raise UserError(f"ami.{key}: {root} is not a DeepSpeed checkpoint directory (no 'latest' file in it; "
                        "expected checkpoints/<network>/ of a training run)")
    tag = latest.read_text(encoding="utf-8").strip()
    files = sorted((root / tag).glob("*.pt"))
    if not files:
        raise UserError(f"ami.{key}: {latest} names checkpoint {tag}, which has no files")
    for file in files:
        safe_torch_load(file, "cpu", mmap=True)


def _check_vocab(run_dir: Path, kind: str, tag: str, saved_sha: str) -> None:
    """The run directory's vocabulary must be the one checkpoint ``tag`` was trained with."""
    from ami_dist.data.prepared import sha256_file

    path = RunDir(run_dir).vocab(kind)
    if not path.is_file():
        raise UserError(f"{path}: missing; checkpoint {tag} was trained with vocabulary sha256 {saved_sha[:12]} "
                        "(restore the file)")
    found = sha256_file(path)
    if found != saved_sha:
        raise UserError(f"{path}: vocabulary sha256 {found[:12]}, but checkpoint {tag} was trained "
                        f"with {saved_sha[:12]} (the file was changed or replaced; restore it)")
