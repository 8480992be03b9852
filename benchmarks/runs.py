"""What the AMI experiments share: one single-process training run, its log beside its run directory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_run(run_dir: Path, config: str, overrides: list[str], store: Path, experiment: str,
              parent: str | None = None) -> Path:
    """``ami_dist/train.py --run_dir RUN_DIR`` in one process of one thread, tracked in ``store``; its output
    goes to RUN_DIR.log. Returns the run directory; a failed run ends the experiment naming its log. A run
    that finished in an earlier invocation (its log says so) is kept, so an interrupted experiment continues."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.parent / f"{run_dir.name}.log"
    if log_path.is_file() and "\nfinished " in log_path.read_text(errors="replace"):
        print(f"  kept: {run_dir} (it finished in an earlier invocation)", flush=True)
        return run_dir
    cmd = [sys.executable, "ami_dist/train.py", "--config", config, "--run_dir", str(run_dir),
           "train.threads_per_rank=1", f"tracking.uri=sqlite:///{store}", f"tracking.experiment={experiment}",
           *([f"tracking.parent_run_id={parent}"] if parent else []), *overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update({"TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    started = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{run_dir} failed with exit code {code}; see {log_path}")
    print(f"  done: {run_dir} in {time.perf_counter() - started:.0f} s", flush=True)
    return run_dir


def create_parent(store: Path, experiment: str, name: str, tags: dict[str, str]) -> str:
    """The MLflow run to nest an experiment's training runs under (``tracking.parent_run_id``): the one an
    earlier invocation with this store made, if any (its kept runs are nested there), else a new one."""
    from mlflow.tracking import MlflowClient

    from ami_dist.tracking import experiment_id

    uri = f"sqlite:///{store}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = experiment_id(client, experiment, uri)  # artifacts beside the store, as training's runs have them
    earlier = client.search_runs([exp_id], filter_string=f"tags.kind = 'experiment' and "
                                 f"attributes.run_name = '{name}'", max_results=1)
    if earlier:
        client.update_run(earlier[0].info.run_id, status="RUNNING")
        return earlier[0].info.run_id
    return client.create_run(exp_id, run_name=name, tags=tags).info.run_id
