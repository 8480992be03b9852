"""The emulated Slurm cluster (tests/slurm/cluster.sh) for the tests in this folder: started once per
session, torn down after, and helpers to submit the batch scripts in slurm/ and watch their jobs.

The cluster needs root (network and mount namespaces). Without it these tests fail and say so; set
AMI_DIST_SKIP_SLURM=1 to skip them on purpose.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT, subprocess_env

HARNESS = ROOT / "tests" / "slurm" / "cluster.sh"
STATE_DIR = Path(os.environ.get("AMI_SLURM_DIR", "/tmp/ami-slurm"))
RECIPE = "tests/slurm/cpu_recipe.yaml"
FAILURE_TIMEOUT_S = 10  # distributed.failure_timeout_s of the test jobs (the recipe's value)


def _refuse_reason() -> str | None:
    if os.geteuid() != 0:
        return "the emulated Slurm cluster needs root (network and mount namespaces)"
    if not Path("/proc/self/ns/net").exists():
        return "this kernel has no network namespaces"
    return None


@dataclass
class Job:
    job_id: str
    work: Path  # run/, logs/, mlflow.db and the batch script's output live here

    @property
    def run_dir(self) -> Path:
        return self.work / "run"

    @property
    def batch_log(self) -> Path:
        return self.work / f"batch-{self.job_id}.out"

    def rank_log(self, rank: int, attempt: int = 0) -> Path:
        (job_dir,) = (self.work / "logs").iterdir()
        return job_dir / f"attempt{attempt}" / f"rank{rank}.log"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.work / 'mlflow.db'}"


class Cluster:
    def __init__(self, conf: str) -> None:
        self.env = subprocess_env() | {"SLURM_CONF": conf}

    def slurm(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def submit(self, script: str, work: Path, overrides: str = "") -> Job:
        """``sbatch`` one of the repository's scripts in CPU mode with the test recipe, one rank per node."""
        return self.sbatch(script, work, ["--ntasks-per-node=1", "--cpus-per-task=1"], {
            "AMI_DEVICE": "cpu",
            "AMI_CONFIG": RECIPE,
            "AMI_PYTHON": PYTHON,
            "AMI_RUN_DIR": str(work / "run"),
            "AMI_LOG_DIR": str(work / "logs"),
            "AMI_FAILURE_TIMEOUT": str(FAILURE_TIMEOUT_S),
            "AMI_OVERRIDES": overrides,
        })

    def sbatch(self, script: str, work: Path, options: list[str], env: dict[str, str]) -> Job:
        """Submit ``script`` from the repository root; output and the MLflow store under ``work``."""
        work.mkdir(parents=True, exist_ok=True)
        env = self.env | {"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"} | env
        proc = subprocess.run(
            ["sbatch", "--parsable", "--time=00:15:00", f"--output={work}/batch-%j.out", *options, script],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return Job(proc.stdout.strip().split(";")[0], work)

    def wait(self, job: Job, timeout_s: float) -> dict[str, str]:
        """Poll ``squeue`` until the job has left the queue; its final ``scontrol show job`` fields."""
        deadline = time.monotonic() + timeout_s
        while self.slurm("squeue", "-h", "-j", job.job_id, check=False).strip():
            if time.monotonic() > deadline:
                self.slurm("scancel", job.job_id, check=False)
                raise AssertionError(f"job {job.job_id} still queued after {timeout_s:.0f} s\n{self.describe(job)}")
            time.sleep(1)
        return self.fields(job)

    def fields(self, job: Job) -> dict[str, str]:
        text = self.slurm("scontrol", "show", "job", job.job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def describe(self, job: Job) -> str:
        """The job's logs, for assertion messages."""
        parts = [job.batch_log.read_text(errors="replace") if job.batch_log.exists() else "(no batch log)"]
        for log in sorted((job.work / "logs").rglob("rank*.log")):
            text = log.read_text(errors="replace").replace("\r", "\n")
            parts.append(f"--- {log.relative_to(job.work)} (tail)\n" + "\n".join(text.splitlines()[-15:]))
        return "\n".join(parts)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    if os.environ.get("AMI_DIST_SKIP_SLURM") == "1":
        pytest.skip("AMI_DIST_SKIP_SLURM=1: the emulated Slurm cluster tests were skipped on request")
    refused = _refuse_reason()
    if refused is not None:
        pytest.fail(f"cannot start the emulated Slurm cluster: {refused}. Run as root, or set "
                    "AMI_DIST_SKIP_SLURM=1 to skip these tests knowingly.", pytrace=False)
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    env = subprocess_env() | {"AMI_SLURM_DIR": str(STATE_DIR)}
    # One cluster per machine at a time: a second test session waits here for the first to finish.
    with open(STATE_DIR.parent / f"{STATE_DIR.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run(["bash", str(HARNESS), "down"], env=env, capture_output=True, timeout=120)  # leftovers
        up = subprocess.run(["bash", str(HARNESS), "up"], env=env, capture_output=True, text=True, timeout=900)
        try:
            if up.returncode != 0:
                pytest.fail(f"cannot start the emulated Slurm cluster:\n{up.stdout}{up.stderr}", pytrace=False)
            yield Cluster(str(STATE_DIR / "etc" / "slurm.conf"))
        finally:
            down = subprocess.run(["bash", str(HARNESS), "down"], env=env, capture_output=True, text=True,
                                  timeout=180)
            assert down.returncode == 0, down.stderr
