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


class _HalfMadeStore:
    """Stands in for ``MlflowClient``: its first ``failures`` openings meet tables another process is still
    creating (the error MLflow's migrations raised in CI), later ones find the store complete."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures, self.error, self.openings = failures, error, 0

    def __call__(self, tracking_uri: str) -> str:
        self.openings += 1
        if self.openings <= self.failures:
            try:  # raised inside MLflow, as a chained error
                raise self.error
            except Exception as inner:
                raise RuntimeError("MLflow's migrations failed") from inner
        return tracking_uri


def _race_error() -> Exception:
    import sqlalchemy.exc

    return sqlalchemy.exc.CircularDependencyError("Circular dependency detected.", [], [])


def test_opening_a_store_another_process_is_creating_waits_for_it(monkeypatch, capsys) -> None:
    import mlflow.tracking

    from ami_dist.tracking import open_client

    store = _HalfMadeStore(2, _race_error())
    monkeypatch.setattr(mlflow.tracking, "MlflowClient", store)
    assert open_client("sqlite:///x/mlflow.db", wait_s=0) == "sqlite:///x/mlflow.db"
    assert store.openings == 3
    assert capsys.readouterr().err.count("being created by another process") == 2


def test_a_store_that_never_opens_is_one_line_naming_it(monkeypatch) -> None:
    import mlflow.tracking
    import pytest

    from ami_dist.errors import UserError
    from ami_dist.tracking import open_client

    store = _HalfMadeStore(99, _race_error())
    monkeypatch.setattr(mlflow.tracking, "MlflowClient", store)
    with pytest.raises(UserError, match=r"^x/mlflow\.db: MLflow could not create or upgrade .*CircularDependency"):
        open_client("sqlite:///x/mlflow.db", attempts=3, wait_s=0)
    assert store.openings == 3


def test_other_errors_and_other_stores_are_not_retried(monkeypatch) -> None:
    import mlflow.tracking
    import pytest

    from ami_dist.tracking import open_client

    store = _HalfMadeStore(1, ValueError("bad URI"))  # not an error of a schema being made
    monkeypatch.setattr(mlflow.tracking, "MlflowClient", store)
    with pytest.raises(RuntimeError):
        open_client("sqlite:///x/mlflow.db", wait_s=0)
    store = _HalfMadeStore(1, _race_error())  # a server's store is the server's business
    monkeypatch.setattr(mlflow.tracking, "MlflowClient", store)
    with pytest.raises(RuntimeError):
        open_client("http://127.0.0.1:5000", wait_s=0)
    assert store.openings == 1
