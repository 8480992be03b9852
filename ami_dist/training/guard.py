"""Non-finite losses and gradients: such an update is skipped on every rank, counted and logged, and a run
with too many bad steps in a row stops with a checkpoint of the last good state.

Agreement between ranks comes from DeepSpeed's ZeRO optimizers (stages 1-3, which is why stage 0 is
refused at load): at each optimizer step they reduce the global gradient norm over all ranks and, when it
is not finite, drop the gradients and skip the update and the LR-schedule step, counting it in the
engine's ``skipped_steps``. The guard makes sure a non-finite loss on any one rank reaches that check (its
backward pass is turned into NaN gradients, whatever the loss's graph looks like), so it adds no
collective of its own.

Faults for tests are injected through the config's ``fault`` section; nothing else reads it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ami_dist.errors import RunStopped


class _PoisonGrad(torch.autograd.Function):
    """Identity forward; NaN gradients backward, so the optimizer's overflow check sees this micro-step."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, math.nan)


class StepGuard:
    """Runs each engine update of a training step and decides whether the step was good.

    ``update`` replaces ``engine.backward(loss); engine.step()``; ``end_step`` closes a training step,
    counting it bad if any of its updates was skipped; after ``max_bad_steps`` bad steps in a row the guard
    is ``exhausted`` and the loop stops with ``stop_error``.
    """

    def __init__(self, max_bad_steps: int, rank: int, nan_loss_steps: list[int] | None = None,
                 nan_grad_steps: list[int] | None = None, fault_rank: int = 0) -> None:
        self.max_bad_steps = max_bad_steps
        self.rank = rank
        self.nan_loss_steps = set(nan_loss_steps or [])
        self.nan_grad_steps = set(nan_grad_steps or [])
        self.fault_rank = fault_rank
        self.step = 0  # the global step being run (1-based once begin_step is called)
        self.skipped_total = 0
        self.bad_in_a_row = 0
        self.last_good_step = 0
        self._skipped_now: list[str] = []

    def begin_step(self, step: int) -> None:
        """``step`` is the number the step will have once done (run.step + 1)."""
        self.step = step
        self._skipped_now = []

    def update(self, engine: Any, loss: torch.Tensor, name: str) -> bool:
        """Backward and optimizer step of ``engine`` on ``loss``; False when the update was skipped."""
        here = self.rank == self.fault_rank
        if here and self.step in self.nan_loss_steps:
            loss = loss * math.nan
        if not bool(torch.isfinite(loss.detach()).all()) or (here and self.step in self.nan_grad_steps):
            loss = _PoisonGrad.apply(torch.nan_to_num(loss))
        skipped_before = engine.skipped_steps
        engine.backward(loss)
        engine.step()
        if engine.skipped_steps == skipped_before:
            return True
        self._skipped_now.append(name)
        return False

    def end_step(self) -> str | None:
        """Close the step: a warning line when it was skipped, None when it was good."""
        if not self._skipped_now:
            self.bad_in_a_row = 0
            self.last_good_step = self.step
            return None
        self.skipped_total += 1
        self.bad_in_a_row += 1
        return (f"step {self.step}: non-finite loss or gradient in {self._what()}; update skipped on every rank "
                f"({self.bad_in_a_row} in a row, {self.skipped_total} in all)")

    @property
    def exhausted(self) -> bool:
        """Too many bad steps in a row: the run must stop (after saving its checkpoint)."""
        return self.bad_in_a_row >= self.max_bad_steps

    def stop_error(self, checkpoint: str) -> RunStopped:
        return RunStopped(
            f"{self.bad_in_a_row} steps in a row (the last, step {self.step}, in {self._what()}) had a non-finite "
            f"loss or gradient, the limit set by train.max_bad_steps; stopped with checkpoint {checkpoint}, which "
            f"holds the weights of step {self.last_good_step} (skipped updates change nothing). Lower the "
            f"learning rate or clip gradients (optim.max_grad_norm), then continue with --resume"
        )

    def _what(self) -> str:
        return ", ".join(dict.fromkeys(self._skipped_now))
