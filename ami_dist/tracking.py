"""Experiment tracking behind one small interface: MLflow on rank 0, a no-op everywhere else.

The default store is the embedded ``sqlite:///mlflow.db`` in the working directory; ``MLFLOW_TRACKING_URI``
or ``tracking.uri`` in the run config choose another. Open the UI on the default store with
``mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

from ami_dist.errors import UserError

DEFAULT_URI = "sqlite:///mlflow.db"
_PARAMS_PER_BATCH = 100  # MLflow's limit on params in one log_batch call
_PARAM_VALUE_MAX = 6000


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Accepts everything, records nothing (ranks other than 0, or tracking disabled)."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store go next to its file (MLflow's default is ./mlruns of the working dir)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///")).resolve()
    return (db.parent / "mlartifacts").as_uri()


def resolve_uri(configured: str | None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else the embedded SQLite store in the working directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def absolute_uri(uri: str) -> str:
    """A SQLite store's URI with its path made absolute (the run may be read from another directory)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


class MlflowTracker:
    """One MLflow run; metrics and params go in batches through MlflowClient (no global fluent state)."""

    def __init__(self, uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None,
                 run_id: str | None = None) -> None:
        logging.getLogger("alembic").setLevel(logging.WARNING)  # schema migrations on a new store are noisy
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self._finished = False
        if run_id is not None:  # a resumed run continues its MLflow run
            try:
                self.client.get_run(run_id)
            except MlflowException:
                raise UserError(f"MLflow run {run_id} not found in {uri} (cannot continue its history)") from None
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=_artifact_location(uri))
        self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags or {}).info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_PARAM_VALUE_MAX]) for k, v in params.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _PARAMS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        if not self._finished:
            self.client.set_terminated(self.run_id, status)
            self._finished = True


def make_tracker(enabled: bool, is_main: bool, uri: str | None, experiment: str, run_name: str,
                 tags: dict[str, str] | None = None, run_id: str | None = None) -> Tracker:
    """An MLflow tracker on rank 0 when tracking is enabled (continuing ``run_id`` if given), else a no-op."""
    if not (enabled and is_main):
        return NullTracker()
    return MlflowTracker(resolve_uri(uri), experiment, run_name, tags, run_id)
