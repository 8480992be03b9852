"""``python -m ami_dist.distributed.mark_failed``: what a batch script runs when rank 0, the only rank
that talks to MLflow, died. It marks a RUNNING run FAILED with the reason, and leaves any other alone."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ami_dist.distributed.mark_failed import mark_failed
from ami_dist.errors import UserError
from tests.conftest import PYTHON, ROOT, subprocess_env


def _run_dir(tmp_path: Path, write_uri_file: bool = True) -> tuple[Path, MlflowClient, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(f"tracking:\n  uri: {uri}\n")
    (run_dir / "mlflow_run_id").write_text(run_id + "\n")
    if write_uri_file:
        (run_dir / "mlflow_tracking_uri").write_text(uri + "\n")
    return run_dir, client, run_id


@pytest.mark.parametrize("write_uri_file", [True, False], ids=["uri-file", "config-uri"])
def test_a_running_run_is_marked_failed_with_the_reason(tmp_path: Path, write_uri_file: bool) -> None:
    run_dir, client, run_id = _run_dir(tmp_path, write_uri_file)
    assert "marked FAILED" in mark_failed(run_dir, "rank 0 of 4 failed: no heartbeat for 61 s")
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"] == "rank 0 of 4 failed: no heartbeat for 61 s"


def test_a_run_that_already_ended_is_left_as_it_is(tmp_path: Path) -> None:
    run_dir, client, run_id = _run_dir(tmp_path)
    client.set_tag(run_id, "failure_reason", "rank 2 of 4 failed: ValueError: x")
    client.set_terminated(run_id, "FAILED")
    assert "left as it is" in mark_failed(run_dir, "srun exited with status 137")
    assert client.get_run(run_id).data.tags["failure_reason"] == "rank 2 of 4 failed: ValueError: x"


def test_a_run_without_mlflow_is_nothing_to_mark(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("tracking:\n  enabled: false\n")
    assert "has no MLflow run" in mark_failed(tmp_path, "whatever")


def test_the_command_line(tmp_path: Path) -> None:
    run_dir, client, run_id = _run_dir(tmp_path)
    proc = subprocess.run([PYTHON, "-m", "ami_dist.distributed.mark_failed", str(run_dir), "--reason", "node lost"],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert client.get_run(run_id).info.status == "FAILED"
    bad = subprocess.run([PYTHON, "-m", "ami_dist.distributed.mark_failed", str(tmp_path / "nowhere")],
                         cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"ami-dist: error: {tmp_path / 'nowhere'}: not a run directory (no config.yaml in it)"
    with pytest.raises(UserError):
        mark_failed(tmp_path / "nowhere", "x")
