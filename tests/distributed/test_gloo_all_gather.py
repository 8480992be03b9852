"""On gloo, DeepSpeed's all-gather (ZeRO-1/2 gather the updated weights with it after each step) runs through
shared memory between ranks of one machine and as one broadcast per rank otherwise
(distributed/deepspeed_adapter/zero_cpu.py):
3 real processes check both against gloo's own all-gather."""

from __future__ import annotations

import subprocess

import pytest

from ami_dist.distributed.deepspeed_adapter.zero_cpu import SHM_ENV
from tests.conftest import PYTHON, ROOT, subprocess_env

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("shm", [True, False], ids=["shared-memory", "broadcasts"])
def test_patched_all_gather_matches_gloo_on_the_world_and_a_subgroup(shm: bool) -> None:
    env = {**subprocess_env(), SHM_ENV: "1" if shm else "0"}
    proc = subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_port", str(29641 + 7 * shm),
         str(ROOT / "tests/distributed/gather_worker.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("ok "))
    assert lines == [f"ok {rank} True {shm}" for rank in range(3)]
