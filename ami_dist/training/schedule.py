"""The alternating AMI schedule: where global step s sits (phase, step in phase, cycle).

An optional MLE pretraining phase (both networks) comes first, then cycles of ``noise_steps``
noise-network batches, ``forward_steps`` forward-network batches and ``backward_steps`` backward-network
batches. The position is a pure function of the step, so a checkpoint that stores the step stores the
position, and a resumed run continues mid-phase exactly where it stopped.
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


class Position(NamedTuple):
    phase: Phase
    step_in_phase: int  # 0-based index of this batch within its phase
    cycle: int  # 0-based AMI cycle; -1 during pretraining


@dataclass(frozen=True)
class Schedule:
    pretrain_steps: int
    noise_steps: int
    forward_steps: int
    backward_steps: int
    cycles: int

    @property
    def cycle_steps(self) -> int:
        return self.noise_steps + self.forward_steps + self.backward_steps

    @property
    def total_steps(self) -> int:
        return self.pretrain_steps + self.cycles * self.cycle_steps

    def position(self, step: int) -> Position:
        """Position of 0-based global step ``step`` (the step about to run)."""
        if not 0 <= step < self.total_steps:
            raise ValueError(f"step {step} outside the schedule's {self.total_steps} steps")
        if step < self.pretrain_steps:
            return Position(Phase.MLE, step, -1)
        cycle, r = divmod(step - self.pretrain_steps, self.cycle_steps)
        for phase, length in ((Phase.NOISE, self.noise_steps), (Phase.FORWARD, self.forward_steps),
                              (Phase.BACKWARD, self.backward_steps)):
            if r < length:
                return Position(phase, r, cycle)
            r -= length
        raise AssertionError("unreachable: r < cycle_steps")
