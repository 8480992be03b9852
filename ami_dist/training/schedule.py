"""The AMI schedule: where global step s sits (stage, phase, step in phase, cycle).

Three stages, as the official release's train.sh runs them: MLE pretraining (both networks), noise
pretraining (the noise network alone, forward and backward frozen), then the adversarial stage: cycles
of ``noise_steps`` noise-network batches, ``forward_steps`` forward-network batches and
``backward_steps`` backward-network batches. The position is a pure function of the step, so a
checkpoint that stores the step stores the position, and a resumed run continues mid-stage and
mid-phase exactly where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple


class Phase(IntEnum):
    """Logged as ``schedule/phase``: 0 noise, 1 forward, 2 backward; -1 for MLE pretraining."""

    MLE = -1
    NOISE = 0
    FORWARD = 1
    BACKWARD = 2


class Stage(IntEnum):
    """Logged as ``schedule/stage``; each stage has its own optimizer settings (see AMIConfig)."""

    MLE = 0
    NOISE_PRETRAIN = 1
    ADVERSARIAL = 2


class Position(NamedTuple):
    phase: Phase
    step_in_phase: int  # 0-based index of this batch within its phase (noise pretraining: within the stage)
    cycle: int  # 0-based AMI cycle; -1 during MLE and noise pretraining

    @property
    def stage(self) -> Stage:
        if self.phase is Phase.MLE:
            return Stage.MLE
        return Stage.NOISE_PRETRAIN if self.cycle < 0 else Stage.ADVERSARIAL


@dataclass(frozen=True)
class Schedule:
    pretrain_steps: int
    noise_pretrain_steps: int
    noise_steps: int
    forward_steps: int
    backward_steps: int
    cycles: int

    @property
    def cycle_steps(self) -> int:
        return self.noise_steps + self.forward_steps + self.backward_steps

    @property
    def total_steps(self) -> int:
        return self.adversarial_start + self.cycles * self.cycle_steps

    @property
    def adversarial_start(self) -> int:
        """The first step of the adversarial stage (the end of both pretraining stages)."""
        return self.pretrain_steps + self.noise_pretrain_steps

    def position(self, step: int) -> Position:
        """Position of 0-based global step ``step`` (the step about to run)."""
        if not 0 <= step < self.total_steps:
            raise ValueError(f"step {step} outside the schedule's {self.total_steps} steps")
        if step < self.pretrain_steps:
            return Position(Phase.MLE, step, -1)
        if step < self.adversarial_start:
            return Position(Phase.NOISE, step - self.pretrain_steps, -1)
        cycle, r = divmod(step - self.adversarial_start, self.cycle_steps)
        for phase, length in ((Phase.NOISE, self.noise_steps), (Phase.FORWARD, self.forward_steps),
                              (Phase.BACKWARD, self.backward_steps)):
            if r < length:
                return Position(phase, r, cycle)
            r -= length
        raise AssertionError("unreachable: r < cycle_steps")
