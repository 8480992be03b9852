"""Rank-failure detection: a heartbeat thread per rank, so that when one rank dies or hangs every other
rank exits non-zero within a known time, naming the rank that failed, instead of waiting in a collective.

Every rank increments its counter in the job's rendezvous store (the TCPStore that ``torch.distributed``
already runs at MASTER_ADDR:MASTER_PORT) every ``interval`` seconds. Rank 0 watches every counter, the
other ranks watch rank 0's and their connection to the store, which lives in rank 0's process (or, under
torchrun, in the launcher beside it). The first verdict, "rank R failed: why", goes into the store; every
rank that reads it prints it and exits; rank 0 first hands it to ``on_failure`` (which marks the MLflow
run FAILED). A rank whose own code raised publishes its exception as the verdict instead.

Time bound, from the moment a rank dies until every other rank has exited: at most
``timeout_s + 4 * interval + MARK_TIMEOUT_S`` with ``interval = clamp(timeout_s / 10, 0.5, 5)``, that is
at most ``timeout_s + 30`` seconds (:func:`exit_bound_s`).

Launchers that end a whole job when one rank exits (DeepSpeed's local launcher, torchrun, srun) send every
other rank SIGTERM and SIGKILL a while later (DeepSpeed: 30 s). :meth:`Watchdog.listen_for_termination` turns
that SIGTERM into the same verdict, fast: heartbeats older than two intervals now count as a failure, so rank 0
names the rank that died and marks the MLflow run before the SIGKILL, whatever its main thread is doing.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

EXIT_RANK_FAILED = 1
MARK_TIMEOUT_S = 10.0  # how long rank 0 may spend telling MLflow before it exits anyway
TERMINATE_GRACE_S = 15.0  # after SIGTERM, how long to look for the failed rank (DeepSpeed kills at 30 s)


def heartbeat_interval(timeout_s: float) -> float:
    """Seconds between heartbeats: a tenth of the timeout, within [0.5, 5]."""
    return min(5.0, max(0.5, timeout_s / 10))


def exit_bound_s(timeout_s: float) -> float:
    """Upper bound on the seconds from a rank's death until every other rank has exited."""
    return timeout_s + 4 * heartbeat_interval(timeout_s) + MARK_TIMEOUT_S


def looks_like_peer_failure(error: BaseException) -> bool:
    """True for errors that a failure elsewhere causes here (a collective whose peer went away, a store
    that stopped answering), so that the rank waits for the verdict instead of blaming itself."""
    import torch.distributed as dist

    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "broken pipe", "socket")
    )


class Watchdog:
    """The heartbeat thread of one rank, and what the main thread tells it when the run fails."""

    def __init__(self, store: Any, rank: int, world_size: int, timeout_s: float, store_address: str,
                 on_failure: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.interval = heartbeat_interval(timeout_s)
        self.stale_after = timeout_s  # heartbeat age that counts as a failure (shorter once SIGTERM came)
        self.store_address = store_address
        self.on_failure = on_failure  # called on rank 0 with the verdict before the process exits
        self.clock = clock
        self.main_state: str | None = None  # None, "waiting" (a peer failure surfaced here) or "reported"
        self.closing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._counts: dict[int, tuple[int, float]] = {}  # rank -> (last counter seen, when it last changed)

    # -- the thread ----------------------------------------------------------------------------------

    def start(self) -> Watchdog:
        now = self.clock()
        self._counts = {r: (-1, now) for r in self._watched()}
        self._thread = threading.Thread(target=self._run, name="ami-watchdog", daemon=True)
        self._thread.start()
        return self

    def _watched(self) -> list[int]:
        return [r for r in range(self.world_size) if r != self.rank] if self.rank == 0 else [0]

    def _run(self) -> None:
        while not self._stop.is_set():
            verdict = self.poll()
            if verdict is not None:
                self._exit_with(verdict)
                return
            self._stop.wait(self.interval)

    def poll(self) -> str | None:
        """One heartbeat and one look around; returns the verdict this rank must exit with, if any."""
        try:
            self.store.add(f"hb/{self.rank}", 1)
            published = self._published()
            if published is not None and self.main_state != "reported":
                return published
            now = self.clock()
            for r in self._watched():
                count = int(self.store.add(f"hb/{r}", 0))
                seen, since = self._counts[r]
                if count != seen:
                    self._counts[r] = (count, now)
                elif now - since > self.stale_after:
                    return self._publish(f"rank {r} of {self.world_size} failed: no heartbeat for "
                                         f"{now - since:.0f} s (the process died or hung)")
        except Exception as e:  # the store's host is gone: its connection does not come back
            if self.closing or self._stop.is_set():
                return None
            return (f"rank 0 of {self.world_size} failed or is unreachable: the rendezvous store at "
                    f"{self.store_address} stopped answering ({type(e).__name__})")
        return None

    def _published(self) -> str | None:
        if not self.store.check(["verdict"]):
            return None
        return self.store.get("verdict").decode()

    def _publish(self, verdict: str) -> str:
        """Store ``verdict`` unless another rank was first; returns the one that stands."""
        return self.store.compare_set("verdict", "", verdict).decode()

    def _exit_with(self, verdict: str) -> None:
        try:
            self.store.add("acks", 1)
        except Exception:
            pass
        print(f"ami-dist: {verdict}; rank {self.rank} exits", file=sys.stderr, flush=True)
        if self.rank == 0:
            self._tell(verdict)
            self._wait_for_acks(self.world_size - 1)  # every rank but the failed one
        sys.stdout.flush()
        os._exit(EXIT_RANK_FAILED)

    def _tell(self, verdict: str) -> None:
        if self.on_failure is None:
            return
        callback = self.on_failure
        helper = threading.Thread(target=lambda: callback(verdict), daemon=True)
        helper.start()
        helper.join(MARK_TIMEOUT_S)

    def _wait_for_acks(self, expected: int) -> None:
        """Rank 0 hosts the store: stay until ``expected`` ranks have read the verdict (or 2 intervals pass)."""
        deadline = self.clock() + 2 * self.interval
        while self.clock() < deadline:
            try:
                if int(self.store.add("acks", 0)) >= expected:
                    return
            except Exception:
                return
            time.sleep(0.05)

    # -- SIGTERM from the launcher -------------------------------------------------------------------

    def listen_for_termination(self) -> None:
        """From now on (main thread only), SIGTERM ends this rank through the watchdog: the failed rank is
        looked for with a short staleness, then named, or, if none is found, this rank's SIGTERM is the verdict.

        The C-level signal handler writes to a wake-up socket from whichever thread the signal lands on, so
        this works while the main thread is blocked inside a collective.
        """
        import signal
        import socket

        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        signal.signal(signal.SIGTERM, lambda signum, frame: None)  # the thread below does the work
        signal.siginterrupt(signal.SIGTERM, False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._await_sigterm, name="ami-sigterm", daemon=True).start()

    def _await_sigterm(self) -> None:
        import signal

        while signal.SIGTERM not in self._wake_r.recv(64):
            pass
        self.stale_after = min(self.timeout_s, 2 * self.interval + 1.0)
        deadline = self.clock() + TERMINATE_GRACE_S
        while self.clock() < deadline and not self._stop.is_set():  # the heartbeat thread exits if it finds one
            time.sleep(0.05)
        try:
            verdict = self._publish(f"rank {self.rank} of {self.world_size} was stopped by SIGTERM (from its "
                                    "launcher or the scheduler) and found no failed rank")
        except Exception:
            verdict = f"rank {self.rank} of {self.world_size} was stopped by SIGTERM"
        self._exit_with(verdict)

    # -- what the main thread calls ------------------------------------------------------------------

    def report(self, error: BaseException) -> None:
        """The main thread's run failed with ``error``. A consequence of another rank's failure: wait (at most
        ``timeout_s + 3 * interval``) for the thread to name that rank and exit. Otherwise, or if no verdict
        comes: publish this rank's own failure so that the others exit, then return."""
        if looks_like_peer_failure(error) and self._thread is not None and self._thread.is_alive():
            self.main_state = "waiting"
            deadline = self.clock() + self.timeout_s + 3 * self.interval
            while self.clock() < deadline and self._thread.is_alive():
                time.sleep(0.1)
        self.main_state = "reported"
        reason = f"{type(error).__name__}: {error}".splitlines()[0][:300] if str(error) else type(error).__name__
        try:
            verdict = self._publish(f"rank {self.rank} of {self.world_size} failed: {reason}")
            self.store.add("acks", 1)
            if self.rank == 0:
                self._wait_for_acks(self.world_size)
        except Exception:
            return
        if not verdict.endswith(reason):  # another rank failed first, and for another reason: say so
            print(f"ami-dist: {verdict}", file=sys.stderr, flush=True)

    def close(self, barrier: Callable[[], None]) -> None:
        """End of the run: meet the other ranks, then stop. A rank 0 that is already gone is no failure now."""
        self.closing = True
        barrier()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def raise_on_sigterm() -> None:
    """For a single process, which has no watchdog: SIGTERM raises Terminated in the main thread (between two
    Python operations), so the run records why it stopped, as a rank of a multi-rank run does."""
    import signal

    from ami_dist.errors import Terminated

    def terminate(signum: int, frame: object) -> None:
        raise Terminated("stopped by SIGTERM (from its launcher or the scheduler)")

    signal.signal(signal.SIGTERM, terminate)


def start_watchdog(rank: int, world_size: int, timeout_s: float,
                   on_failure: Callable[[str], None] | None = None, catch_sigterm: bool = False) -> Watchdog | None:
    """A running watchdog for this rank of a multi-rank job (None for a single process); with
    ``catch_sigterm``, SIGTERM is its business too (not when SIGTERM is the preemption signal)."""
    if world_size < 2:
        return None
    import torch.distributed as dist

    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    interval = heartbeat_interval(timeout_s)
    client = dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=max(5.0, 2 * interval)))
    # Keys of an earlier attempt under torchrun (whose store outlives the workers) must not count.
    store = dist.PrefixStore(f"ami-watchdog/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", client)
    watchdog = Watchdog(store, rank, world_size, timeout_s, f"{host}:{port}", on_failure).start()
    if catch_sigterm:
        watchdog.listen_for_termination()
    return watchdog
