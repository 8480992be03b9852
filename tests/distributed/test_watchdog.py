"""The rank watchdog's decisions, one poll at a time, on a real TCPStore and a clock the test moves:
a silent rank is named after the timeout, the verdict reaches every rank, a rank's own error is published
at once, a lost store means rank 0 is gone, and the time bound the docs promise follows from the settings."""

from __future__ import annotations

import datetime
import socket
from collections.abc import Iterator

import pytest
import torch.distributed as dist

from ami_dist.distributed.watchdog import Watchdog, exit_bound_s, heartbeat_interval, looks_like_peer_failure

TIMEOUT = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(port: int) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=5))


@pytest.fixture
def server() -> Iterator[tuple[dist.TCPStore, int]]:
    port = _free_port()
    yield _server(port), port


def _ranks(port: int, world: int, clock: Clock) -> list[Watchdog]:
    """One watchdog per rank, each with its own store client, none of them with a thread."""
    dogs = []
    for rank in range(world):
        client = dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False,
                               timeout=datetime.timedelta(seconds=2))
        dog = Watchdog(dist.PrefixStore("w/", client), rank, world, TIMEOUT, f"127.0.0.1:{port}", clock=clock)
        dog._counts = {r: (-1, clock()) for r in dog._watched()}
        dogs.append(dog)
    return dogs


def test_a_silent_rank_is_named_after_the_timeout_and_everyone_hears_it(server) -> None:
    _, port = server
    clock = Clock()
    dogs = _ranks(port, 3, clock)
    for dog in dogs:
        assert dog.poll() is None
    verdict = None
    while verdict is None and clock.now < 1100:  # rank 2 is silent from now on; ranks 0 and 1 poll every second
        clock.now += 1.0
        assert dogs[1].poll() is None
        verdict = dogs[0].poll()
    # rank 0 last saw rank 2's counter move at t=1 (its first poll came before rank 2's first beat)
    assert clock.now - 1000 == 12.0
    assert verdict == "rank 2 of 3 failed: no heartbeat for 11 s (the process died or hung)"
    assert dogs[1].poll() == verdict  # rank 1 reads the verdict at its next poll


def test_a_rank_that_keeps_beating_is_never_declared(server) -> None:
    _, port = server
    clock = Clock()
    dogs = _ranks(port, 2, clock)
    for _ in range(40):
        assert dogs[1].poll() is None
        assert dogs[0].poll() is None
        clock.now += 1.0


def test_a_rank_s_own_error_is_published_at_once(server) -> None:
    _, port = server
    clock = Clock()
    dogs = _ranks(port, 3, clock)
    dogs[2].report(ValueError("bad batch"))  # not caused by a peer: no waiting
    assert dogs[0].poll() == "rank 2 of 3 failed: ValueError: bad batch"
    assert dogs[1].poll() == "rank 2 of 3 failed: ValueError: bad batch"
    assert dogs[2].poll() is None  # the rank that reported leaves through its own exception


def test_the_first_verdict_stands(server) -> None:
    _, port = server
    dogs = _ranks(port, 2, Clock())
    dogs[1].report(KeyError("first"))
    dogs[0].report(RuntimeError("later, and a consequence"))
    assert dogs[0]._published() == "rank 1 of 2 failed: KeyError: 'first'"


def test_losing_the_store_means_rank_0_is_gone() -> None:
    port = _free_port()
    store = _server(port)  # the store lives in rank 0's process
    dogs = _ranks(port, 2, Clock())
    assert dogs[1].poll() is None
    del store  # rank 0 dies: every connection to its store closes
    verdict = dogs[1].poll()
    assert verdict is not None and verdict.startswith(f"rank 0 of 2 failed or is unreachable: the rendezvous "
                                                      f"store at 127.0.0.1:{port} stopped answering")


def test_a_closing_run_does_not_count_the_store_s_end_as_a_failure() -> None:
    port = _free_port()
    store = _server(port)
    dogs = _ranks(port, 2, Clock())
    dogs[1].close(barrier=lambda: None)
    del store
    assert dogs[1].poll() is None


def test_errors_caused_by_a_dead_peer_are_told_apart() -> None:
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.3]")
    assert looks_like_peer_failure(gloo)
    assert looks_like_peer_failure(dist.DistNetworkError("Broken pipe"))
    assert not looks_like_peer_failure(ValueError("connection"))  # only runtime/dist errors qualify
    assert not looks_like_peer_failure(RuntimeError("CUDA out of memory"))


@pytest.mark.parametrize(("timeout", "interval", "bound"), [(10, 1.0, 24.0), (60, 5.0, 90.0), (3, 0.5, 15.0)])
def test_the_documented_bound(timeout: float, interval: float, bound: float) -> None:
    assert heartbeat_interval(timeout) == interval
    assert exit_bound_s(timeout) == bound
    assert exit_bound_s(timeout) <= timeout + 30  # what the config help and the README promise
