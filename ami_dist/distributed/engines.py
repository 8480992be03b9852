"""DeepSpeed engines: the ZeRO preset plus computed batch arithmetic, one engine per network, gathering."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ami_dist.config.schema import OptimConfig, TrainConfig
from ami_dist.errors import ConfigError

# Written by us from the run config; a preset that sets them differently is a mistake worth reporting.
COMPUTED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                 "gradient_clipping")


def load_preset(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON preset; errors name the file (and line for JSON syntax)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        presets = ", ".join(sorted(p.name for p in Path("configs").glob("ds_*.json"))) or "none found"
        raise ConfigError(f"{path}: DeepSpeed preset not found (presets in configs/: {presets})") from None
    except (IsADirectoryError, UnicodeDecodeError):
        raise ConfigError(f"{path}: expected a UTF-8 JSON file") from None
    try:
        preset = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(preset, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    stage = preset.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        # ZeRO's optimizers skip a non-finite update on every rank alike (see training/guard.py); stage 0's
        # plain optimizer would apply it. Stage 1 costs nothing over plain data parallelism.
        raise ConfigError(f"{path}: zero_optimization.stage: expected 1, 2 or 3, got {stage!r}")
    for key in ("optimizer", "scheduler"):
        if key in preset:
            raise ConfigError(f"{path}: {key}: set the optimizer and its schedule in the run config's optim "
                              "section, not in the DeepSpeed preset")
    return preset


def micro_batch_size(batch_size: int, world_size: int, grad_accum: int) -> int:
    """Sentences per rank per micro-step; the global batch must split evenly."""
    per_step = world_size * grad_accum
    if batch_size % per_step:
        raise ConfigError(
            f"train.batch_size: {batch_size} does not divide by world size {world_size} x train.grad_accum "
            f"{grad_accum} = {per_step}; choose a multiple of {per_step}"
        )
    return batch_size // per_step


def resolve_ds_config(preset: dict[str, Any], preset_path: str | Path, train: TrainConfig, optim: OptimConfig,
                      world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of one network: the preset with batch sizes and clipping computed from ours."""
    micro = micro_batch_size(train.batch_size, world_size, train.grad_accum)
    computed = {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": optim.max_grad_norm,
    }
    for key in COMPUTED_KEYS:
        if key in preset and preset[key] != computed[key]:
            raise ConfigError(
                f"{preset_path}: {key}: the preset says {preset[key]!r} but the run config gives {computed[key]!r} "
                "(leave it out of the preset: it is computed from train.batch_size, train.grad_accum, the "
                "world size and optim.max_grad_norm)"
            )
    cfg = copy.deepcopy(preset)
    cfg.update(computed)
    # Our optimizers are client-side torch optimizers (SGD is not one of DeepSpeed's built-ins).
    cfg["zero_allow_untested_optimizer"] = True
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, ds_config: dict[str, Any]) -> Any:
    """Wrap one network in its own DeepSpeed engine (own optimizer, scheduler and ZeRO partitioning)."""
    from ami_dist.distributed.deepspeed_cpu import (
        import_deepspeed,
        release_gradients_when_flattened,
        share_weights_between_ranks,
    )
    from ami_dist.distributed.safe_load import use_safe_loading

    deepspeed = import_deepspeed()

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, dist_init_required=False)
    if share_master_weights(engine.optimizer):
        release_gradients_when_flattened(engine.optimizer)
        share_weights_between_ranks(engine.optimizer)
    use_safe_loading(engine)  # its checkpoints are read with weights_only=True
    return engine


def share_master_weights(zero_optimizer: Any) -> bool:
    """Let ZeRO-1/2 update this rank's slice of the model's weights in place when they are float32.

    ZeRO keeps a "master" copy of the rank's slice in float32 for the optimizer and copies it back into
    the (usually half-precision) weights after each step. For a float32 model that copy is the same
    numbers twice: 76 MB for the dialog LSTM on one rank. Here the master slice becomes a view of the
    model's own slice (the copy back is then a copy onto itself), and DeepSpeed's links from each weight
    to its master fragment are rebuilt. Returns whether anything was shared.
    """
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(zero_optimizer, DeepSpeedZeroOptimizer) or zero_optimizer.cpu_offload:
        return False
    pairs = []
    for i, master in enumerate(zero_optimizer.single_partition_of_fp32_groups):
        rank = torch.distributed.get_rank(group=zero_optimizer.real_dp_process_group[i])
        own = zero_optimizer.parallel_partitioned_bit16_groups[i][rank]
        if (own.dtype, own.device, own.shape) != (master.dtype, master.device, master.shape):
            return False
        pairs.append((master, own))
    for master, own in pairs:
        master.data = own.data  # same tensor object (the optimizer's parameter), the model's storage
    zero_optimizer._link_all_hp_params()
    return True


@contextmanager
def gradient_clipping(engine: Any, max_norm: float) -> Iterator[None]:
    """Clip this engine's gradients to ``max_norm`` (0 = no clipping) for the steps inside the block.

    DeepSpeed fixes clipping at initialisation (in its config and, under ZeRO, in the optimizer);
    AMI's adversarial steps clip differently from the MLE steps of the same network.
    """
    previous = engine.gradient_clipping()

    def set_to(value: float) -> None:
        engine._config.gradient_clipping = value
        if hasattr(engine.optimizer, "clip_grad"):
            engine.optimizer.clip_grad = value

    set_to(max_norm)
    try:
        yield
    finally:
        set_to(previous)


def load_module_weights(engine: Any, checkpoint_dir: str | Path) -> None:
    """Load only the network weights of the newest checkpoint in ``checkpoint_dir`` (no optimizer state)."""
    path, _ = engine.load_checkpoint(str(checkpoint_dir), load_module_only=True, load_optimizer_states=False,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise ConfigError(f"{checkpoint_dir}: no DeepSpeed checkpoint found (expected a 'latest' file and a tag "
                          "directory, as written by a training run under checkpoints/<network>/)")


def full_parameters(engine: Any) -> dict[str, torch.Tensor]:
    """Every parameter of the engine's network, whole (gathered from the shards under ZeRO-3), on CPU."""
    model = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
