"""Preemption: a signal (Slurm sends one before the time limit, ``--signal=USR1@<s>``) asks the run to
checkpoint and stop; the ranks agree on it at a step boundary, so every rank stops after the same step.
"""

from __future__ import annotations

import signal
from typing import Any, Protocol

EXIT_REQUEUE = 75
"""Exit code of a run that stopped on the preemption signal with a checkpoint: "run me again" (sysexits'
EX_TEMPFAIL). The Slurm batch scripts requeue the job on it; anything else is success or failure."""

SIGNALS = {"SIGUSR1": signal.SIGUSR1, "SIGUSR2": signal.SIGUSR2, "SIGTERM": signal.SIGTERM}


class _AnyRank(Protocol):
    def all_true(self, flag: bool) -> bool: ...


class Preemption:
    """Remembers that the preemption signal arrived; :meth:`should_stop` turns that into a joint decision.

    The handler only sets a flag: the step in progress finishes, and no rank stops on its own while the
    others wait for it in a collective.
    """

    def __init__(self, signal_name: str = "SIGUSR1") -> None:
        self.signal_name = signal_name
        self.received: str | None = None  # name of the signal this rank got, if any
        self.stopped = False  # the ranks agreed to stop (sticky)
        self._previous: Any = None

    def install(self) -> Preemption:
        """Catch the signal from now on (main thread only). ``"none"`` installs nothing."""
        if self.signal_name == "none":
            return self
        signum = SIGNALS[self.signal_name]
        self._previous = signal.signal(signum, self._handle)
        # Restart interrupted system calls instead of failing them with EINTR: the signal may land while
        # this rank sits in a socket read of a collective or writes a checkpoint.
        signal.siginterrupt(signum, False)
        return self

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(SIGNALS[self.signal_name], self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum).name

    def should_stop(self, comm: _AnyRank) -> bool:
        """True on every rank when the signal reached any rank (a collective: all ranks call it each step)."""
        if not self.stopped:
            self.stopped = not comm.all_true(self.received is None)
        return self.stopped
