"""The preemption signal through the real command line (one process, no Slurm): the run checkpoints,
exits with code 75 and leaves its MLflow run SCHEDULED; the same command again (--run_dir, as a
requeued job runs it) resumes from that checkpoint into the same MLflow run and finishes it."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ami_dist.cli import main
from ami_dist.distributed.preemption import EXIT_REQUEUE
from tests.conftest import PYTHON, ROOT, subprocess_env, tiny_config, write_config

MLE_STEPS = 150


def _metric_logged(uri: str, run_dir: Path) -> bool:
    id_file = run_dir / "mlflow_run_id"
    return id_file.is_file() and bool(MlflowClient(uri).get_metric_history(id_file.read_text().strip(), "fw/mle_nll"))


@pytest.mark.distributed
def test_preempted_run_exits_75_and_the_same_command_resumes_it(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, train={"batch_size": 16, "mle_steps": MLE_STEPS, "log_every": 1})
    uri = cfg["tracking"]["uri"]
    run_dir = tmp_path / "job-42"
    command = [PYTHON, "ami_dist/train.py", "--config", str(write_config(tmp_path, cfg)), "--run_dir", str(run_dir)]
    first = subprocess.Popen(command, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 240
    while not _metric_logged(uri, run_dir) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.3)
    first.send_signal(signal.SIGUSR1)
    out, err = first.communicate(timeout=240)
    assert first.returncode == EXIT_REQUEUE, err[-3000:]
    step = int(out.split("preempted (SIGUSR1) after step ")[1].split()[0])
    assert 0 < step < MLE_STEPS
    client = MlflowClient(uri)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "SCHEDULED"
    assert (run_dir / "checkpoints" / "forward" / "latest").read_text().strip() == f"step{step}"

    second = subprocess.run(command, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed {run_dir} from checkpoint step{step} (step {step})" in second.stdout
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.tags["preempted_at_step"] == str(step)
    steps = sorted(m.step for m in client.get_metric_history(run_id, "fw/mle_nll"))
    assert steps == list(range(1, MLE_STEPS + 1))


@pytest.mark.distributed
def test_sigterm_to_a_single_process_marks_its_run_failed(tmp_path: Path) -> None:
    """A world of one has no watchdog; SIGTERM still ends it with one line, exit 143 and a FAILED MLflow run."""
    cfg = tiny_config(tmp_path, train={"batch_size": 16, "mle_steps": MLE_STEPS, "log_every": 1})
    uri = cfg["tracking"]["uri"]
    run_dir = tmp_path / "single"
    proc = subprocess.Popen([PYTHON, "ami_dist/train.py", "--config", str(write_config(tmp_path, cfg)), "--run_dir",
                             str(run_dir)], cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not _metric_logged(uri, run_dir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == "ami-dist: stopped by SIGTERM (from its launcher or the scheduler)"
    run = MlflowClient(uri).get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FAILED" and "SIGTERM" in run.data.tags["failure_reason"], run.data.tags


def test_run_dir_without_a_run_in_it_needs_a_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--run_dir", str(tmp_path / "new")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"ami-dist: error: --run_dir {tmp_path / 'new'}: holds no run yet, so --config is needed to start one")


def test_run_dir_and_resume_exclude_each_other(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--run_dir", str(tmp_path), "--resume", str(tmp_path)]) == 2
    assert "--resume and --run_dir exclude each other" in capsys.readouterr().err
