"""Optimizer settings per stage: the adversarial stage trains at its own learning rate and clipping.

The release's train.sh fine-tunes adversarially with ``--learning_rate 0.01 --max_grad_norm 0.1`` after
MLE pretraining at the recipe's own schedule; here ``ami.adv_lr`` and ``ami.adv_max_grad_norm`` say the
same. The stage is a pure function of the step (``Schedule.position``), so a resumed run re-derives its
learning rate and clipping from its step, not from anything saved.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from weakref import WeakKeyDictionary

from ami_dist.training.schedule import Stage


class StageLR:
    """A network's LR multiplier: its own schedule, or the constant ``adv_lr`` in the adversarial stage."""

    def __init__(self, schedule: Callable[[int], float], base_lr: float, adv_lr: float = 0.0) -> None:
        self.schedule = schedule
        self.base_lr = base_lr
        self.adv_lr = adv_lr
        self.adversarial = False

    def __call__(self, done: int) -> float:
        if self.adversarial and self.adv_lr > 0:
            return self.adv_lr / self.base_lr
        return self.schedule(done)


# Kept beside the scheduler, not on it: LambdaLR saves every attribute of its own in its state dict.
_MULTIPLIERS: WeakKeyDictionary[Any, StageLR] = WeakKeyDictionary()


def register_stage_lr(scheduler: Any, multiplier: StageLR) -> None:
    _MULTIPLIERS[scheduler] = multiplier


def stage_lr(scheduler: Any) -> StageLR | None:
    """The StageLR a scheduler built by ``build_optimizer`` follows (None for any other scheduler)."""
    return _MULTIPLIERS.get(scheduler)


def set_stage(schedulers: list[Any], stage: Stage) -> None:
    """Switch the schedulers' multipliers to ``stage`` and apply the learning rate at once (not one step late)."""
    for scheduler in schedulers:
        multiplier = stage_lr(scheduler)
        if multiplier is None:
            continue
        multiplier.adversarial = stage is Stage.ADVERSARIAL
        for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base * multiplier(scheduler.last_epoch)


def max_grad_norm(stage: Stage | None, adv_max_grad_norm: float, update_clip: float | None = None) -> float | None:
    """The gradient-norm bound of an update now; None keeps the engine's own (optim.max_grad_norm).

    ``update_clip`` is an adversarial update's own bound (``ami.fw_adv_clip``, ``bw_adv_clip``; 0 = none).
    In the adversarial stage ``adv_max_grad_norm`` bounds every update as well and the smaller bound wins,
    as in the release, where the optimizer's own clipping follows the adversarial step's.
    """
    limits = [] if update_clip is None else [update_clip]
    if stage is Stage.ADVERSARIAL and adv_max_grad_norm > 0:
        limits.append(adv_max_grad_norm)
    if not limits:
        return None
    positive = [c for c in limits if c > 0]
    return min(positive) if positive else 0.0
