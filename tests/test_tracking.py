"""The MLflow tracker on an embedded store: a resumed run may change config values (MLflow params cannot
change, so the new values become tags) without losing the params it had."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from ami_dist.tracking import MlflowTracker


def test_a_resumed_run_records_changed_params_as_tags(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = MlflowTracker(uri, "resume", "run")
    first.log_params({"train.mle_steps": 4, "model.dropout": 0.1})
    first.finish("SCHEDULED")

    again = MlflowTracker(uri, "resume", "run", run_id=first.run_id)
    again.log_params({"train.mle_steps": 6, "model.dropout": 0.1, "train.keep_checkpoints": 3})
    again.finish()

    run = MlflowClient(tracking_uri=uri).get_run(first.run_id)
    assert run.data.params == {"train.mle_steps": "4", "model.dropout": "0.1", "train.keep_checkpoints": "3"}
    assert run.data.tags["resumed_with/train.mle_steps"] == "4 -> 6"
    assert not any(key.startswith("resumed_with/model") for key in run.data.tags)
    assert run.info.status == "FINISHED"


SWEEP_WORKER = """
import sys, time
from pathlib import Path
uri, index, go = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
from ami_dist.tracking import MlflowTracker
go.with_name(f"ready{index}").touch()
while not go.exists():  # every process past its imports before any opens the store
    time.sleep(0.01)
tracker = MlflowTracker(uri, "sweep", f"run{index}")
for step in range(1, 21):
    tracker.log_metrics({"loss": float(step)}, step)
tracker.finish()
"""


def test_runs_started_together_on_a_new_sqlite_store_all_finish(tmp_path: Path) -> None:
    """A sweep's first runs open an embedded store that does not exist yet at the same moment: each creates
    or finds the tables and the experiment once (before, 3 of 4 died in MLflow's schema creation)."""
    import subprocess
    import time

    from tests.conftest import PYTHON, ROOT, subprocess_env

    uri, go = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}", tmp_path / "go"
    procs = [subprocess.Popen([PYTHON, "-c", SWEEP_WORKER, uri, str(i), str(go)], cwd=ROOT, env=subprocess_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    deadline = time.monotonic() + 240
    while len(list(tmp_path.glob("ready*"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "sweep"]
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"run{i}" for i in range(4)]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, 21))


DATASETS_WORKER = """
import sys, time
from pathlib import Path
uri, index, go = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
from ami_dist.tracking import MlflowTracker
tracker = MlflowTracker(uri, "sweep", f"run{index}")
go.with_name(f"ready{index}").touch()
while not go.exists():  # every run created before any logs its data
    time.sleep(0.001)
for k in range(30):
    tracker.log_inputs([{"name": f"corpus{k}/train", "digest": "0123456789abcdef", "context": "training",
                         "source": {"train_src": "train.en"}, "profile": {"pairs": k}}])
tracker.finish()
"""


def test_runs_logging_the_same_datasets_at_once_all_get_them(tmp_path: Path) -> None:
    """The runs of a sweep log the same corpus as a dataset input at the same moment. MLflow looks the dataset
    up and inserts it when it finds none, so all but one such insert fail on its unique key (measured: 5 of 40
    calls in 4 processes); the tracker then links the dataset the other run inserted."""
    import subprocess
    import time

    from tests.conftest import PYTHON, ROOT, subprocess_env

    uri, go = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "go"
    MlflowTracker(uri, "sweep", "first").finish()  # the store and experiment exist: only the datasets race
    procs = [subprocess.Popen([PYTHON, "-c", DATASETS_WORKER, uri, str(i), str(go)], cwd=ROOT, env=subprocess_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    deadline = time.monotonic() + 240
    while len(list(tmp_path.glob("ready*"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweep").experiment_id
    for run in client.search_runs([experiment], "attributes.run_name LIKE 'run%'"):
        names = sorted(i.dataset.name for i in run.inputs.dataset_inputs)
        assert names == sorted(f"corpus{k}/train" for k in range(30)), run.info.run_name
