"""``python -m ami_dist.distributed.mark_failed RUN_DIR [--reason TEXT]``: mark a run's MLflow run FAILED
from outside the training processes.

Only rank 0 talks to MLflow, so when rank 0 itself is killed nobody in the job can; the Slurm scripts call
this after ``srun`` fails. A run that is no longer RUNNING (rank 0 already marked it, or it finished) is
left as it is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from ami_dist.entry import command
from ami_dist.errors import UserError
from ami_dist.run_dir import RunDir


def mark_failed(run_dir: Path, reason: str) -> str:
    """Set the run's status to FAILED with ``reason`` as its ``failure_reason`` tag; returns what was done."""
    id_file = RunDir(run_dir).mlflow_run_id
    config_file = RunDir(run_dir).config
    if not config_file.is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml in it)")
    if not id_file.is_file():
        return f"{run_dir} has no MLflow run (tracking off, or the run stopped before it was created)"
    run_id = id_file.read_text(encoding="utf-8").strip()
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from ami_dist.tracking import resolve_uri

    uri_file = RunDir(run_dir).mlflow_tracking_uri  # written by rank 0 with the store it used, made absolute
    if uri_file.is_file():
        uri = uri_file.read_text(encoding="utf-8").strip()
    else:  # only the key needed from the saved config, so that a moved data file cannot stop this
        tracking = (yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}).get("tracking") or {}
        uri = resolve_uri(tracking.get("uri"))
    client = MlflowClient(tracking_uri=uri)
    try:
        status = client.get_run(run_id).info.status
    except MlflowException:
        raise UserError(f"MLflow run {run_id} (from {id_file}) not found in {uri}") from None
    if status != "RUNNING":
        return f"MLflow run {run_id} is {status}; left as it is"
    client.set_tag(run_id, "failure_reason", reason[:500])
    client.set_terminated(run_id, "FAILED")
    return f"MLflow run {run_id} marked FAILED: {reason}"


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ami_dist.distributed.mark_failed",
                                     description="Mark a run's MLflow run FAILED (when rank 0 could not).")
    parser.add_argument("run_dir", type=Path, help="the run directory (holds config.yaml and mlflow_run_id)")
    parser.add_argument("--reason", default="the job failed (reported by its launcher)",
                        help="recorded as the run's failure_reason tag")
    args = parser.parse_args(argv)
    print(f"ami-dist: {mark_failed(args.run_dir, args.reason)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
