"""slurm/nmt_4node.sh on the emulated 4-node cluster, in CPU mode with the test recipe: a whole run, a
preempted run that requeues itself and resumes, and a run that loses a rank."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.ranks import hit_and_time_the_others
from tests.slurm.conftest import FAILURE_TIMEOUT_S, Cluster, Job

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCRIPT = "slurm/nmt_4node.sh"
NODES = ["node1", "node2", "node3", "node4"]
TOTAL_STEPS = 10  # the recipe: 4 MLE steps, then one AMI cycle of 2 noise, 2 forward and 2 backward steps


def _only_run(job: Job):
    client = MlflowClient(tracking_uri=job.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("slurm-test").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def _wait_until_training(cluster: Cluster, job: Job, timeout_s: float = 240) -> None:
    """Until rank 0 has logged a training step to MLflow (start-up is over on every rank)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        id_file = job.run_dir / "mlflow_run_id"
        if id_file.is_file():
            client = MlflowClient(tracking_uri=job.tracking_uri)
            if client.get_metric_history(id_file.read_text().strip(), "fw/mle_nll"):
                return
        time.sleep(0.5)
    raise AssertionError(f"no training step logged after {timeout_s} s\n{cluster.describe(job)}")


def _rank_pids(job: Job) -> dict[int, int]:
    """Process id of each rank's trainer (the nodes share this machine's process ids)."""
    pids = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            env = dict(v.split(b"=", 1) for v in (entry / "environ").read_bytes().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if (env.get(b"SLURM_JOB_ID") == job.job_id.encode() and len(argv) > 1
                and Path(argv[1].decode()).name == "train.py" and b"SLURM_PROCID" in env
                and os.path.basename(argv[0].decode()).startswith("python")):
            pids[int(env[b"SLURM_PROCID"])] = int(entry.name)
    return pids



def test_four_ranks_train_ami_on_four_nodes(cluster: Cluster, tmp_path: Path) -> None:
    job = cluster.submit(SCRIPT, tmp_path)
    fields = cluster.wait(job, timeout_s=420)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), cluster.describe(job)

    client, run = _only_run(job)
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "4"
    assert run.data.tags["hosts"] == ",".join(NODES)  # one rank on each emulated node
    assert run.data.tags["launcher"] == "slurm"
    phases = client.get_metric_history(run.info.run_id, "schedule/phase")
    assert {m.step for m in phases} == set(range(1, TOTAL_STEPS + 1))
    assert {m.value for m in phases} == {-1.0, 0.0, 1.0, 2.0}  # MLE, then the noise, forward, backward phases
    assert client.get_metric_history(run.info.run_id, "fw/adv_loss")
    assert "valid/fw_bleu" in run.data.metrics

    ckpt, tag = job.run_dir / "checkpoints", f"step{TOTAL_STEPS}"
    for engine in ("forward", "backward", "noise"):
        assert (ckpt / engine / "latest").read_text().strip() == tag
        # ZeRO-2: each of the 4 ranks saved its own shard of the optimizer state
        shards = sorted(p.name for p in (ckpt / engine / tag).glob("zero_pp_rank_*_optim_states.pt"))
        assert shards == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(4)]
    assert sorted(p.name for p in (ckpt / "ranks" / tag).iterdir()) == [f"rank{r}.pt" for r in range(4)]
    assert all(job.rank_log(r).is_file() for r in range(4))
    assert "training finished" in job.batch_log.read_text()


def test_preempted_job_requeues_and_resumes_into_the_same_mlflow_run(cluster: Cluster, tmp_path: Path) -> None:
    mle_steps = 80
    job = cluster.submit(SCRIPT, tmp_path, overrides=f"train.mle_steps={mle_steps}")
    _wait_until_training(cluster, job)
    # what Slurm does at --signal=USR1@<s> before the time limit: USR1 to every task of the job's steps
    cluster.slurm("scancel", "--signal=USR1", job.job_id)
    fields = cluster.wait(job, timeout_s=480)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        cluster.describe(job)

    stopped = re.search(r"preempted \(SIGUSR1\) after step (\d+) of", job.rank_log(0, attempt=0).read_text())
    assert stopped, cluster.describe(job)
    step = int(stopped.group(1))
    assert 0 < step < mle_steps
    batch = job.batch_log.read_text()
    assert "requeueing job" in batch and "attempt 1" in batch
    assert f"from checkpoint step{step} (step {step})" in job.rank_log(0, attempt=1).read_text()
    for rank in range(4):  # every rank stopped at the same step and saved its part of that checkpoint
        assert (job.run_dir / "checkpoints" / "ranks" / f"step{step}" / f"rank{rank}.pt").is_file()

    client, run = _only_run(job)  # the requeued job continued the MLflow run instead of starting one
    assert run.info.status == "FINISHED"
    assert run.data.tags["preempted_at_step"] == str(step)
    logged = [m.step for m in client.get_metric_history(run.info.run_id, "schedule/phase")]
    assert sorted(logged) == list(range(1, mle_steps + 7))  # every step once, before and after the requeue


@pytest.mark.parametrize("victim", [2, 0])
def test_a_killed_rank_ends_every_rank_in_bounded_time(cluster: Cluster, tmp_path: Path, victim: int) -> None:
    job = cluster.submit(SCRIPT, tmp_path, overrides="train.mle_steps=5000")
    _wait_until_training(cluster, job)
    pids = _rank_pids(job)
    assert sorted(pids) == [0, 1, 2, 3], cluster.describe(job)
    hit_and_time_the_others(pids, victim, signal.SIGKILL, FAILURE_TIMEOUT_S)

    fields = cluster.wait(job, timeout_s=120)
    assert fields["JobState"] == "FAILED", cluster.describe(job)
    batch = job.batch_log.read_text()
    assert re.search(rf"task {victim}: Killed", batch), batch
    for rank in range(4):
        if rank != victim:  # every other rank exited non-zero, and its log names the failed rank
            assert re.search(rf"task {rank}: Exited with exit code [1-9]", batch), batch
            assert f"ami-dist: rank {victim} of 4 failed" in job.rank_log(rank).read_text(errors="replace")
    assert f"training failed (srun status 137): rank {victim} of 4 failed" in batch

    _, run = _only_run(job)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"].startswith(f"rank {victim} of 4 failed")
