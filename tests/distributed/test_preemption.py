"""The preemption flag: the handler only records the signal; ranks stop together once any rank got it,
also across two real processes (gloo) of which only one is signalled."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest

from ami_dist.distributed.preemption import Preemption
from tests.conftest import PYTHON, ROOT, subprocess_env


class OtherRanks:
    """``all_true`` over this rank and other ranks whose answers are given."""

    def __init__(self, *others: bool) -> None:
        self.others = others
        self.calls = 0

    def all_true(self, flag: bool) -> bool:
        self.calls += 1
        return flag and all(self.others)


@pytest.fixture
def preemption():
    p = Preemption("SIGUSR1").install()
    yield p
    p.uninstall()


def test_the_signal_sets_the_flag_and_the_process_lives_on(preemption: Preemption) -> None:
    assert preemption.received is None
    os.kill(os.getpid(), signal.SIGUSR1)  # the default action would end this process
    assert preemption.received == "SIGUSR1"
    assert not preemption.stopped  # nothing stops until the ranks agree at a step boundary
    assert preemption.should_stop(OtherRanks(True, True))


def test_no_signal_anywhere_means_no_stop(preemption: Preemption) -> None:
    assert not preemption.should_stop(OtherRanks(True, True, True))
    assert not preemption.stopped


def test_a_signal_on_another_rank_stops_this_one_too(preemption: Preemption) -> None:
    assert preemption.should_stop(OtherRanks(True, False, True))  # rank 2 of 4 got it; this rank did not
    assert preemption.received is None


def test_the_decision_sticks_without_further_collectives(preemption: Preemption) -> None:
    comm = OtherRanks(False)
    assert preemption.should_stop(comm) and preemption.should_stop(comm)
    assert comm.calls == 1


def test_uninstall_restores_the_previous_handler() -> None:
    before = signal.getsignal(signal.SIGUSR2)
    p = Preemption("SIGUSR2").install()
    assert signal.getsignal(signal.SIGUSR2) == p._handle
    p.uninstall()
    assert signal.getsignal(signal.SIGUSR2) == before


def test_none_installs_no_handler() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    Preemption("none").install()
    assert signal.getsignal(signal.SIGUSR1) == before


WORKER = """
import datetime, os, signal, sys
import torch.distributed as dist
from ami_dist.distributed.comm import Comm
from ami_dist.distributed.env import detect_launch
from ami_dist.distributed.preemption import Preemption

preemption = Preemption("SIGUSR1").install()
info = detect_launch()
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
comm = Comm(info)
for step in range(1, 50):
    if info.rank == 1 and step == 7:
        os.kill(os.getpid(), signal.SIGUSR1)
    comm.barrier()  # stands in for a training step's collectives
    if preemption.should_stop(comm):
        break
print(f"rank {info.rank} stopped after step {step} received={preemption.received}", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_two_processes_stop_after_the_same_step() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen([PYTHON, "-c", WORKER], cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=subprocess_env() | {"RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                                 "MASTER_PORT": str(port)})
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-2000:]
    assert "rank 0 stopped after step 7 received=None" in outputs[0][0]
    assert "rank 1 stopped after step 7 received=SIGUSR1" in outputs[1][0]
