"""One rank of a local deepspeed-launched job dies (SIGKILL) or hangs (SIGSTOP): every other rank exits
non-zero within the documented bound, naming the failed rank, and the MLflow run ends FAILED with the reason
as its tag. (Rank 0 itself dying, when nobody in the job is left to tell MLflow, is the Slurm scripts' job:
tests/slurm/test_slurm_jobs.py.)"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, subprocess_env, tiny_config, write_config
from tests.ranks import alive, hit_and_time_the_others

pytestmark = pytest.mark.distributed

LAUNCHER = str(ROOT / ".venv/bin/deepspeed") if (ROOT / ".venv/bin/deepspeed").exists() else "deepspeed"
FAILURE_TIMEOUT_S = 8


def _rank_pids(launcher: psutil.Process, world_size: int) -> dict[int, int]:
    pids = {}
    for child in launcher.children(recursive=True):
        try:
            cmdline, rank = child.cmdline(), child.environ().get("RANK")
        except psutil.Error:
            continue
        if "ami_dist/train.py" in cmdline and rank is not None:  # a rank, not a launcher process
            pids[int(rank)] = child.pid
    assert sorted(pids) == list(range(world_size)), pids
    return pids



@pytest.mark.parametrize(("world_size", "victim", "how"), [(2, 1, "SIGKILL"), (2, 1, "SIGSTOP"), (4, 3, "SIGKILL")],
                         ids=["2 ranks, one killed", "2 ranks, one hung", "4 ranks, one killed"])
def test_every_other_rank_stops_in_bounded_time(tmp_path: Path, world_size: int, victim: int, how: str) -> None:
    cfg = tiny_config(tmp_path, model={"emb_dim": 16, "hidden_size": 16},
                      train={"batch_size": 16, "mle_steps": 100000, "log_every": 1000},
                      distributed={"failure_timeout_s": FAILURE_TIMEOUT_S}, tracking={"experiment": "ranks"})
    config = write_config(tmp_path, cfg)
    port = 29750 + 10 * world_size + (how == "SIGSTOP")
    job = subprocess.Popen(
        [LAUNCHER, "--num_gpus", str(world_size), "--master_port", str(port), "ami_dist/train.py",
         "--deepspeed_config", "configs/ds_zero2.json", "--config", str(config), "--run_dir", str(tmp_path / "run")],
        cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    pids: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "run" / "mlflow_run_id").exists():  # rank 0 writes it just before training
            assert job.poll() is None, job.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the job did not start training"
            time.sleep(0.2)
        time.sleep(3)  # into the training steps
        pids = _rank_pids(psutil.Process(job.pid), world_size)
        hit_and_time_the_others(pids, victim, getattr(signal, how), FAILURE_TIMEOUT_S)
        if how == "SIGSTOP":  # the hung process cannot act; the launcher's clean-up needs it to run again
            os.kill(pids[victim], signal.SIGCONT)
        output = job.communicate(timeout=120)[0]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        for pid in pids.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert job.returncode != 0
    for rank in pids:  # each survivor says which rank failed as it exits
        if rank != victim:
            assert re.search(rf"ami-dist: rank {victim} of {world_size} failed: no heartbeat .*; rank {rank} exits",
                             output), output[-3000:]
    client = MlflowClient(tracking_uri=cfg["tracking"]["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("ranks").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"].startswith(f"rank {victim} of {world_size} failed: no heartbeat")
