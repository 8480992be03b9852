"""DeepSpeed engines: the ZeRO preset plus computed batch arithmetic, one engine per network, gathering."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ami_dist.config.schema import OptimConfig, TrainConfig
from ami_dist.errors import ConfigError

# Buffer sizes (in elements) a preset may leave to "auto": then they are sized from the network (size_buffers).
AUTO_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_max_live_parameters",
             "stage3_max_reuse_distance")

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
    for key in AUTO_KEYS:
        value = preset.get("zero_optimization", {}).get(key)
        if value is not None and value != "auto" and (not isinstance(value, int) or value <= 0):
            raise ConfigError(f"{path}: zero_optimization.{key}: expected a positive number of elements or "
                              f"\"auto\" (sized from the network), got {value!r}")
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


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def size_buffers(ds_config: dict[str, Any], sizes: list[int]) -> None:
    """Replace "auto" in ``ds_config``'s zero_optimization (in place) by sizes from the network's parameter
    sizes (elements): the gradient bucket and ZeRO-3's prefetch bucket hold the largest parameter (DeepSpeed
    needs at least that), and ZeRO-3 keeps at most two such parameters whole at a time.

    DeepSpeed's defaults and the usual 5e7 are sized for billions of parameters: ZeRO-3 allocates its
    gradient bucket in full for each engine, 191 MB of float32 for the paper's NMT LSTM, whose largest
    parameter (its 8k x 1024 embedding) needs 31 MB (benchmarks/zero_memory.py).
    """
    zero = ds_config.get("zero_optimization", {})
    largest = max(sizes, default=1)
    figures = {"reduce_bucket_size": largest, "stage3_prefetch_bucket_size": largest,
               "stage3_max_live_parameters": 2 * largest, "stage3_max_reuse_distance": 2 * largest}
    for key, value in figures.items():
        if zero.get(key) == "auto":
            zero[key] = value


def construct_model(make: Callable[[bool], nn.Module], ds_config: dict[str, Any]) -> nn.Module:
    """The network ``make(initialise)`` builds, for an engine of ``ds_config``, whose "auto" buffer sizes are
    resolved from it (in place, before anything is allocated: from a copy on the meta device).

    Under ZeRO-3 it is built inside ``deepspeed.zero.Init``, each module partitioned as it is constructed, so
    no rank ever holds the whole network; its initialisation then runs one parameter at a time, each gathered
    for its own step (the network's ``init_plan``), which draws the same numbers as a plain construction.
    """
    if any(ds_config.get("zero_optimization", {}).get(key) == "auto" for key in AUTO_KEYS):
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            size_buffers(ds_config, [p.numel() for p in make(False).parameters()])
    if zero_stage(ds_config) != 3:
        return make(True)
    import deepspeed

    from ami_dist.distributed.deepspeed_adapter import adapt_zero3_construction

    adapt_zero3_construction()  # CPU and gloo only
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = make(False)
    plan = model.init_plan() if hasattr(model, "init_plan") else []
    for name, init in plan:
        param = model.get_parameter(name)
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            init(param)
    return model


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, ds_config: dict[str, Any]) -> Any:
    """Wrap one network in its own DeepSpeed engine (own optimizer, scheduler and ZeRO partitioning)."""
    import deepspeed

    from ami_dist.distributed.deepspeed_adapter import adapt_engine
    from ami_dist.distributed.safe_load import use_safe_loading

    size_buffers(ds_config, [getattr(p, "ds_numel", p.numel()) for p in model.parameters()])  # if not yet
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, dist_init_required=False)
    adapt_engine(engine)  # CPU and gloo only (deepspeed_adapter); nothing under NCCL
    use_safe_loading(engine)  # its checkpoints are read with weights_only=True
    return engine


@contextmanager
def gradient_clipping(engine: Any, max_norm: float) -> Iterator[None]:
    """Clip this engine's gradients to ``max_norm`` (0 = no clipping) for the steps inside the block.

    DeepSpeed fixes clipping at initialisation (in its config and, under ZeRO, in the optimizer);
    AMI's adversarial steps clip differently from the MLE steps of the same network.
    """
    from ami_dist.distributed.deepspeed_adapter import set_gradient_clipping

    previous = engine.gradient_clipping()
    set_gradient_clipping(engine, max_norm)
    try:
        yield
    finally:
        set_gradient_clipping(engine, previous)


def load_module_weights(engine: Any, checkpoint_dir: str | Path) -> None:
    """Load only the network weights of the newest checkpoint in ``checkpoint_dir`` (no optimizer state),
    written on any number of ranks and any ZeRO stage (an MLE run on 8 GPUs may start AMI on 4)."""
    from ami_dist.distributed.reshard import load_resharded_weights

    latest = Path(checkpoint_dir) / "latest"
    if not latest.is_file():
        raise ConfigError(f"{checkpoint_dir}: no DeepSpeed checkpoint found (expected a 'latest' file and a tag "
                          "directory, as written by a training run under checkpoints/<network>/)")
    load_resharded_weights(engine, Path(checkpoint_dir) / latest.read_text(encoding="utf-8").strip())


def full_parameters(engine: Any) -> dict[str, torch.Tensor]:
    """Every parameter of the engine's network, whole (gathered from the shards under ZeRO-3), on CPU."""
    model = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
