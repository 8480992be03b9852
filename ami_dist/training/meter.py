"""Running means of training metrics between log lines, reduced over ranks in one collective."""

from __future__ import annotations

import math

from ami_dist.distributed.comm import Comm


class Meter:
    """Sums and counts per metric name; ``reduce`` gives the mean over all ranks and resets."""

    def __init__(self, names: list[str]) -> None:
        self.names = sorted(names)  # the same order on every rank: the reduction is positional
        self.reset()

    def reset(self) -> None:
        self.sums = dict.fromkeys(self.names, 0.0)
        self.counts = dict.fromkeys(self.names, 0.0)

    def add(self, name: str, value: float, count: float = 1.0) -> None:
        """Add ``value`` as the total of ``count`` observations (e.g. summed NLL over count tokens).

        A non-finite value (its update was skipped; the step guard counts it) is left out of the mean.
        """
        if not math.isfinite(value):
            return
        self.sums[name] += value
        self.counts[name] += count

    def reduce(self, comm: Comm) -> dict[str, float]:
        """Means over all ranks of the metrics observed anywhere since the last reduce."""
        totals = comm.sum([self.sums[n] for n in self.names] + [self.counts[n] for n in self.names])
        k = len(self.names)
        self.reset()
        return {n: totals[i] / totals[k + i] for i, n in enumerate(self.names) if totals[k + i] > 0}
