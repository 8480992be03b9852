"""The shared-memory all-reduce, reduce-scatter and all-gather between ranks of one machine
(distributed/shm_collectives), in 3 real processes: exact results on the world and a subgroup, and a
collective fallback to gloo."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT, subprocess_env

pytestmark = pytest.mark.distributed


def test_shared_memory_collectives_match_their_definition_and_fall_back_together(tmp_path: Path) -> None:
    proc = subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_port", "29659",
         str(ROOT / "tests/distributed/shm_worker.py"), str(tmp_path)],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("ok "))
    assert lines == ["ok 0", "ok 1", "ok 2"]


def test_segments_of_dead_creators_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    """Rank 0 unlinks its segment once mapped; only a rank 0 killed in between leaves one behind, and the
    next job's rank 0 removes it."""
    import os

    from ami_dist.distributed.shm_collectives import _remove_orphans

    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / f"ami-dist-{gone.pid}-0123456789ab").write_bytes(b"x")
    (tmp_path / f"ami-dist-{os.getpid()}-0123456789ab").write_bytes(b"x")
    (tmp_path / "someone-else").write_bytes(b"x")
    _remove_orphans(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"ami-dist-{os.getpid()}-0123456789ab",
                                                                "someone-else"])
