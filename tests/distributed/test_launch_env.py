"""Where a process sits in a Slurm job: rank, world size, local rank and master from Slurm's variables,
and the launcher still known as Slurm when asked again (the CLI asks before and inside init)."""

from __future__ import annotations

from ami_dist.distributed.env import detect_launch

SLURM_TASK = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "2(x4)",
              "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_JOB_ID": "123456"}


def test_slurm_variables_become_what_torch_distributed_reads() -> None:
    env = dict(SLURM_TASK)
    info = detect_launch(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.local_world_size) == ("slurm", 5, 8, 1, 2)
    assert info.master_addr == "gpu07"  # the first host of the job's node list
    assert info.master_port == 29500 + 123456 % 10000
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("5", "8", "1", "gpu07")


def test_asking_twice_still_says_slurm() -> None:
    env = dict(SLURM_TASK)
    detect_launch(env)
    again = detect_launch(env)  # RANK is set now, by us
    assert (again.launcher, again.rank, again.world_size) == ("slurm", 5, 8)


def test_a_port_from_the_batch_script_wins() -> None:
    env = dict(SLURM_TASK, MASTER_ADDR="gpu09", MASTER_PORT="20123")
    info = detect_launch(env)
    assert (info.master_addr, info.master_port) == ("gpu09", 20123)


def test_torchrun_inside_slurm_keeps_torchrun_s_ranks() -> None:
    env = dict(SLURM_TASK, RANK="3", WORLD_SIZE="16", LOCAL_RANK="3")
    info = detect_launch(env)
    assert (info.launcher, info.rank, info.world_size) == ("deepspeed/torchrun", 3, 16)


def test_deepspeed_is_imported_without_mlflow_and_mlflow_still_imports_after() -> None:
    """DeepSpeed's autotuner imports MLflow (≈120 MB per rank) when it can; ranks that do not track skip it."""
    import subprocess
    import sys

    code = ("import sys; from ami_dist.distributed.comm import import_deepspeed; import_deepspeed(); "
            "assert 'deepspeed' in sys.modules; assert 'mlflow' not in sys.modules, 'mlflow imported'; "
            "import mlflow; print('ok', mlflow.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-1].startswith("ok ")
