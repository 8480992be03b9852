"""Watching rank processes from a test: is one still running, and did the others stop in time."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from ami_dist.distributed.watchdog import exit_bound_s


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (an exited rank its launcher has not reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def hit_and_time_the_others(pids: dict[int, int], victim: int, how: signal.Signals,
                            failure_timeout_s: float) -> None:
    """Send ``how`` to rank ``victim``; every other rank must exit within the watchdog's documented bound."""
    os.kill(pids[victim], how)
    hit_at = time.monotonic()
    survivors = [pid for rank, pid in pids.items() if rank != victim]
    bound = exit_bound_s(failure_timeout_s)
    while any(alive(p) for p in survivors) and time.monotonic() - hit_at < bound + 60:
        time.sleep(0.2)
    took = time.monotonic() - hit_at
    assert not any(alive(p) for p in survivors), f"ranks still running {took:.0f} s after the {how.name}"
    assert took <= bound, f"the other ranks took {took:.1f} s to exit; the documented bound is {bound:.0f} s"
