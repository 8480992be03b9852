"""What the MLflow UI shows of training runs: a model-training experiment, the data as dataset inputs with
their digests, system metrics per run, and a comparison nested under the parent of the runs it compares."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ami_dist.tracking import MlflowTracker
from tests.conftest import DATA, PYTHON, ROOT, subprocess_env, tiny_config, write_config


def _train(tmp: Path, name: str, parent: str) -> str:
    cfg = tiny_config(tmp, run={"name": name, "output_dir": str(tmp / "runs"), "seed": 7},
                      train={"batch_size": 16, "mle_steps": 12, "log_every": 4},
                      model={"emb_dim": 16, "hidden_size": 16},
                      tracking={"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "ux", "parent_run_id": parent,
                                "system_metrics_s": 0.5})
    cfg["distributed"] = {"deepspeed_config": str(ROOT / "configs/ds_zero2.json")}
    config = write_config(tmp, cfg, f"{name}.yaml")
    proc = subprocess.run([PYTHON, str(ROOT / "ami_dist/train.py"), "--config", str(config), "--run_dir",
                           str(tmp / name)], cwd=tmp, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (tmp / name / "mlflow_run_id").read_text().strip()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("ux")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    parent = MlflowTracker(uri, "ux", "sweep", {"kind": "experiment"})
    runs = [_train(tmp, name, parent.run_id) for name in ("a", "b")]
    parent.finish()
    return {"tmp": tmp, "uri": uri, "parent": parent.run_id, "runs": runs, "client": MlflowClient(uri)}


def test_the_experiment_is_a_model_training_experiment(store: dict) -> None:
    experiment = store["client"].get_experiment_by_name("ux")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_training_and_validation_data_are_the_runs_dataset_inputs(store: dict) -> None:
    run = store["client"].get_run(store["runs"][0])
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"tatoeba_en_de/train", "tatoeba_en_de/valid"}
    contexts = {name: {t.key: t.value for t in i.tags}["mlflow.data.context"] for name, i in inputs.items()}
    assert contexts == {"tatoeba_en_de/train": "training", "tatoeba_en_de/valid": "validation"}
    train = json.loads(inputs["tatoeba_en_de/train"].dataset.profile)
    assert train["pairs"] == int(run.data.params["train_pairs"])
    for key, name in (("train_src", "train.en"), ("train_tgt", "train.de")):
        assert train[key] == hashlib.sha256((DATA / "tatoeba_en_de" / name).read_bytes()).hexdigest()
    digests = {i.dataset.digest for i in inputs.values()}
    assert len(digests) == 2 and all(len(d) == 16 for d in digests)
    other = store["client"].get_run(store["runs"][1])  # the same data, read the same way: the same digests
    assert {i.dataset.digest for i in other.inputs.dataset_inputs} == digests


def test_each_run_logs_system_metrics(store: dict) -> None:
    for run_id in store["runs"]:
        metrics = store["client"].get_run(run_id).data.metrics
        assert "system/cpu_utilization_percentage" in metrics, sorted(metrics)
        assert metrics["system/system_memory_usage_megabytes"] > 0
        history = store["client"].get_metric_history(run_id, "system/cpu_utilization_percentage")
        assert len(history) >= 2


def test_a_comparison_of_the_arms_is_nested_under_their_parent(store: dict) -> None:
    proc = subprocess.run([PYTHON, "-m", "ami_dist.compare", "--uri", store["uri"], "--experiment", "ux", "--out",
                           str(store["tmp"] / "cmp")], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    client = store["client"]
    experiment = client.get_experiment_by_name("ux").experiment_id
    (comparison,) = client.search_runs([experiment], "tags.kind = 'comparison'")
    assert comparison.data.tags["mlflow.parentRunId"] == store["parent"]
    assert comparison.data.tags["compared_runs"] == ",".join(store["runs"])  # not the parent itself
    for run_id in store["runs"]:
        assert client.get_run(run_id).data.tags["mlflow.parentRunId"] == store["parent"]
