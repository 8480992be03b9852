"""On gloo, DeepSpeed's all-gather (ZeRO-1/2 gather the updated weights with it after each step) runs as one
broadcast per rank (distributed/comm.py): 3 real processes check it against gloo's own all-gather."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import PYTHON, ROOT, subprocess_env

pytestmark = pytest.mark.distributed


def test_patched_all_gather_matches_gloo_on_the_world_and_a_subgroup() -> None:
    proc = subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_port", "29641",
         str(ROOT / "tests/distributed/gather_worker.py")],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("ok "))
    assert lines == ["ok 0 True", "ok 1 True", "ok 2 True"]
