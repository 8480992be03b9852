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
