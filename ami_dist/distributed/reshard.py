"""Resume a network's DeepSpeed checkpoint on another number of ranks, or under another ZeRO stage.

DeepSpeed loads a ZeRO checkpoint only on the world size that wrote it ("The checkpoint being loaded used a
DP world size of 2 but the current world size is 1"). Its answer, the universal checkpoint
(``ds_to_universal`` then ``checkpoint.load_universal``), converts Adam's two moments only: a checkpoint of
SGD with momentum (the paper's LSTM recipes) fails in its converter for ZeRO-1/2 and in its loader for
ZeRO-3. So the resharding here reads the checkpoint files itself and writes what they hold through
DeepSpeed's public ZeRO API (``deepspeed.utils.safe_set_full_fp32_param``, under ZeRO-3
``safe_set_local_fp32_param``), which places a tensor into this rank's partition whatever the stage:

- :class:`ZeroCheckpoint` reads one network's checkpoint (``checkpoints/<network>/<tag>/``) of any world
  size and ZeRO stage 1, 2 or 3 as whole tensors, one parameter at a time: the fp32 master weights and
  every tensor the optimizer keeps per element (Adam's ``exp_avg`` and ``exp_avg_sq``, SGD's
  ``momentum_buffer``, ...), from the ranks' flat partitions (memory-mapped, so a rank holds one
  parameter's tensors at a time, not the checkpoint);
- :func:`load_resharded` puts them into an engine built for this run's world size and stage, with the
  optimizer's scalar state (Adam's ``step``), its hyperparameters, the learning-rate schedule and the
  engine's step counters, and returns the checkpoint's client state (what ``engine.load_checkpoint``
  returns second). It touches no ``_``-prefixed DeepSpeed state: besides the public setter, only the torch
  optimizer ZeRO wraps (``engine.optimizer.optimizer``: its ``state`` and ``param_groups``) and the engine's
  public step counters.

Every rank reads every shard of the checkpoint (memory-mapped, from the run directory's shared storage):
a one-time cost of one checkpoint's size per rank when the world size changes; a resume on the same world
size and stage loads as before, each rank its own shard.

The layout read here is DeepSpeed's checkpoint format (the keys of ``deepspeed.checkpoint.constants``):
``zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` holds rank r's flat partitions, per parameter group
(ZeRO-1/2: with each parameter's ``(start, numel)`` fragment in ``param_slice_mappings``) or per sub-group
(ZeRO-3: parameter after parameter, each ``ceil(numel / world)`` long). ``tests/distributed/test_reshard.py``
checks it against DeepSpeed's own ``zero_to_fp32`` and, through a 2 -> 1 -> 3 rank round trip, bit for bit.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ami_dist.distributed.safe_load import safe_torch_load
from ami_dist.errors import UserError

OPTIM_FILE = "zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
BF16_PREFIX = "bf16_"  # what DeepSpeed's BF16_Optimizer (bf16 weights, ZeRO-1) puts before OPTIM_FILE
FP32 = "fp32"  # the master weights, as DeepSpeed's universal checkpoint names them


def _optim_file(directory: Path, rank: int) -> Path:
    plain = directory / OPTIM_FILE.format(rank=rank)
    bf16 = directory / (BF16_PREFIX + plain.name)
    return bf16 if bf16.is_file() and not plain.is_file() else plain


def saved_world_size(directory: Path) -> int:
    """How many ranks wrote the ZeRO checkpoint in ``directory`` (one optimizer-state file each)."""
    directory = Path(directory)
    return sum(1 for _ in directory.glob(OPTIM_FILE.format(rank="*"))) + sum(
        1 for _ in directory.glob(BF16_PREFIX + OPTIM_FILE.format(rank="*")))


def saved_zero_stage(directory: Path) -> int:
    """The ZeRO stage of the checkpoint in ``directory``: 3 when each rank wrote its own model-states file."""
    return 3 if (Path(directory) / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file() else 2


def model_states_file(directory: Path) -> Path:
    """The file of a ZeRO checkpoint that holds the client state, the schedule and the step counters."""
    directory = Path(directory)
    return directory / ("zero_pp_rank_0_mp_rank_00_model_states.pt" if saved_zero_stage(directory) == 3 else
                        "mp_rank_00_model_states.pt")


class ZeroCheckpoint:
    """One network's ZeRO checkpoint directory, read as whole tensors whatever wrote it."""

    def __init__(self, directory: str | Path) -> None:
        from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM_SHAPES

        self.directory = Path(directory)
        self.world = saved_world_size(self.directory)
        if self.world == 0:
            raise UserError(f"{self.directory}: no ZeRO optimizer states in it (expected "
                            f"{OPTIM_FILE.format(rank=0)} and one such file per rank)")
        self._optim = [safe_torch_load(_optim_file(self.directory, r), "cpu", mmap=True)[OPTIMIZER_STATE_DICT]
                       for r in range(self.world)]
        self.stage = int(self._optim[0].get("zero_stage", 1))  # BF16_Optimizer's (ZeRO-1) records none
        self.model_states: dict[str, Any] = safe_torch_load(model_states_file(self.directory), "cpu", mmap=True)
        self._shapes = [dict(group) for group in self.model_states[PARAM_SHAPES]]
        self._group = {name: g for g, group in enumerate(self._shapes) for name in group}
        if self.stage == 3:  # where each parameter starts in its sub-group's flat partition (the same on every rank)
            self._offsets: dict[str, int] = {}
            for group in self._shapes:
                offset = 0
                for name, shape in group.items():
                    self._offsets[name] = offset
                    offset += math.ceil(math.prod(shape) / self.world)

    def names(self) -> list[str]:
        """The parameters the checkpoint holds, in the order they were saved."""
        return list(self._group)

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self._shapes[self._group[name]][name])

    def _torch_optimizer(self, rank: int) -> dict[str, Any]:
        """The state dict of the torch optimizer ZeRO wrapped, as rank ``rank`` saved it."""
        from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE, OPTIMIZER_STATE_DICT

        return self._optim[rank][OPTIMIZER_STATE_DICT if self.stage == 3 else BASE_OPTIMIZER_STATE]

    def _state(self, rank: int, group: int) -> dict[str, Any]:
        """Rank ``rank``'s optimizer state of one parameter group (ZeRO-1/2) or sub-group (ZeRO-3)."""
        states = self._torch_optimizer(rank)["state"]
        if isinstance(states, list):
            return states[group] if group < len(states) else {}
        return states.get(group, {})

    def _flat(self, rank: int, group: int, key: str) -> torch.Tensor:
        from deepspeed.checkpoint.constants import SINGLE_PARTITION_OF_FP32_GROUPS

        if key == FP32:
            return self._optim[rank]["fp32_flat_groups" if self.stage == 3 else SINGLE_PARTITION_OF_FP32_GROUPS][group]
        return self._state(rank, group)[key]

    def state_keys(self, name: str) -> list[str]:
        """The optimizer's per-element tensors of parameter ``name`` (its scalars, like Adam's step, excluded)."""
        return sorted(key for key, value in self._state(0, self._group[name]).items()
                      if torch.is_tensor(value) and value.dim() > 0)

    def scalars(self) -> dict[str, Any]:
        """The optimizer's scalar state (Adam's ``step``), as the first parameter group holds it."""
        return {key: value for key, value in self._state(0, 0).items()
                if not (torch.is_tensor(value) and value.dim() > 0)}

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's hyperparameters (learning rate and the rest), one dict per group, without params."""
        return [{k: v for k, v in group.items() if k != "params"} for group in self._torch_optimizer(0)["param_groups"]]

    def tensor(self, name: str, key: str = FP32) -> torch.Tensor:
        """Parameter ``name``'s whole ``key`` tensor (``fp32``, or one of :meth:`state_keys`), in its shape."""
        from deepspeed.checkpoint.constants import PARAM_SLICE_MAPPINGS

        group, shape = self._group[name], self.shape(name)
        numel = math.prod(shape)
        pieces = []
        for rank in range(self.world):
            flat = self._flat(rank, group, key)
            if self.stage == 3:
                per_rank = math.ceil(numel / self.world)
                count = max(0, min(per_rank, numel - rank * per_rank))
                start = self._offsets[name]
            else:
                fragment = self._optim[rank][PARAM_SLICE_MAPPINGS][group].get(name)
                if fragment is None:  # this rank's partition holds none of it
                    continue
                start, count = fragment.start, fragment.numel
            if count:
                pieces.append(flat.narrow(0, start, count))
        whole = torch.cat(pieces) if pieces else torch.empty(0)
        if whole.numel() != numel:
            raise UserError(f"{self.directory}: the ranks' partitions hold {whole.numel()} elements of {name} "
                            f"({key}), its shape {tuple(shape)} has {numel}: the checkpoint is incomplete")
        return whole.reshape(shape).clone()


def load_resharded(engine: Any, directory: str | Path) -> dict[str, Any]:
    """Load the ZeRO checkpoint in ``directory``, written on any world size and ZeRO stage, into ``engine``
    (collective: every rank of the engine calls it). Returns the checkpoint's client state (what
    ``engine.load_checkpoint`` returns second)."""
    checkpoint = ZeroCheckpoint(directory)
    params = _fitting_parameters(engine, checkpoint)
    zero3 = engine.zero_optimization_stage() == 3
    # The optimizer's state has the layout of the fp32 master partitions it updates. DeepSpeed creates it at the
    # first step, and its per-parameter setter needs it created; so each state tensor is written through the
    # master setter into the master partitions, copied from there into the (torch) optimizer's state, and the
    # masters are written last. The same order on every rank: ZeRO-3's gathers are collectives.
    base = engine.optimizer.optimizer
    # ZeRO-3 empties the torch optimizer's param groups between its steps; its masters are kept here
    flats = list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or
                 [flat for group in base.param_groups for flat in group["params"]])
    for key in sorted({key for name in checkpoint.names() for key in checkpoint.state_keys(name)}):
        for name in checkpoint.names():
            value = (checkpoint.tensor(name, key) if key in checkpoint.state_keys(name) else
                     torch.zeros(checkpoint.shape(name)))
            _set_master(params[name], value, zero3)
        for flat in flats:
            base.state[flat][key] = flat.detach().clone()
    _barrier()  # a machine's ranks may share the weights the masters alias (deepspeed_adapter)
    _set_weights(engine, checkpoint, params)
    for group, saved in zip(base.param_groups, checkpoint.param_groups(), strict=False):
        group.update(saved)
    scalars = checkpoint.scalars()
    for state in base.state.values():
        for key, value in scalars.items():
            state[key] = value.clone() if torch.is_tensor(value) else value
    states = checkpoint.model_states
    if engine.lr_scheduler is not None and states.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(states["lr_scheduler"])
    engine.global_steps = int(states.get("global_steps", 0))
    engine.global_samples = int(states.get("global_samples", 0))
    engine.skipped_steps = int(states.get("skipped_steps", 0))
    return states


def load_resharded_weights(engine: Any, directory: str | Path) -> None:
    """Only the network weights (fp32 masters and the network's own copy) of the ZeRO checkpoint in
    ``directory``, written on any world size and stage, into ``engine`` (collective); no optimizer state."""
    checkpoint = ZeroCheckpoint(directory)
    _set_weights(engine, checkpoint, _fitting_parameters(engine, checkpoint))


def _fitting_parameters(engine: Any, checkpoint: ZeroCheckpoint) -> dict[str, torch.nn.Parameter]:
    """The engine's parameters by name, which must be the checkpoint's, of the same shapes."""
    params = dict(engine.module.named_parameters())
    if sorted(params) != sorted(checkpoint.names()):
        missing = sorted(set(params) - set(checkpoint.names()))
        extra = sorted(set(checkpoint.names()) - set(params))
        raise UserError(f"{checkpoint.directory}: does not fit this run's network (missing {missing[:5]}, "
                        f"unexpected {extra[:5]})")
    for name in checkpoint.names():
        have = tuple(getattr(params[name], "ds_shape", params[name].shape))
        if have != tuple(checkpoint.shape(name)):
            raise UserError(f"{checkpoint.directory}: {name} has shape {tuple(checkpoint.shape(name))}, this run's "
                            f"network {have}")
    return params


def _set_weights(engine: Any, checkpoint: ZeroCheckpoint, params: dict[str, torch.nn.Parameter]) -> None:
    zero3 = engine.zero_optimization_stage() == 3
    for name in checkpoint.names():
        master = checkpoint.tensor(name)
        _set_master(params[name], master, zero3)
        _set_weight(params[name], master, zero3)
    _barrier()


def _set_master(param: torch.nn.Parameter, value: torch.Tensor, zero3: bool) -> None:
    """This rank's part of a weight's fp32 master copy, from the whole ``value``.

    Under ZeRO-3 a rank holds ``ceil(numel / world)`` elements of each weight, the last rank's padded; DeepSpeed
    0.19's whole-tensor setter reads past the end of ``value`` there (a 16000-element weight on 3 ranks: "start
    (10668) + length (5334) exceeds dimension size (16000)"), so this rank's padded slice goes through its
    setter of the local partition instead.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

    if not zero3:
        safe_set_full_fp32_param(param, value)
        return
    size = param.ds_tensor.numel()
    start = torch.distributed.get_rank() * size if torch.distributed.is_initialized() else 0
    piece = value.flatten()[start:start + size]
    local = torch.zeros(size, dtype=piece.dtype)
    local[:piece.numel()] = piece
    safe_set_local_fp32_param(param, local)


def _set_weight(param: torch.nn.Parameter, value: torch.Tensor, zero3: bool) -> None:
    """The network's own copy of a weight (the 16-bit or fp32 one the forward pass uses)."""
    if not zero3:
        with torch.no_grad():
            param.data.copy_(value.to(device=param.device, dtype=param.dtype))
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
        if param.numel():  # gathered on every rank; rank 0's copy is partitioned back out
            param.data.copy_(value.to(device=param.device, dtype=param.dtype))


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
