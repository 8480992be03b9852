"""A sweep on one embedded store: four training runs started together on a store that does not exist yet, each
logging every step (and its system metrics), while a fifth process reads the store the way the UI does. Every
run finishes, and every metric of every run is there exactly once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import PYTHON, ROOT, subprocess_env, tiny_config, write_config

STEPS = 20
READER = """
import sys, time
from pathlib import Path
from mlflow.tracking import MlflowClient
client, stop, reads = MlflowClient(sys.argv[1]), Path(sys.argv[2]), 0
while not stop.exists():
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            for key in list(run.data.metrics)[:5]:
                client.get_metric_history(run.info.run_id, key)
            reads += 1
    time.sleep(0.05)
print(reads)
"""


@pytest.mark.distributed
def test_four_runs_and_a_reader_share_one_new_sqlite_store(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    commands = []
    for i in range(4):
        cfg = tiny_config(tmp_path, run={"name": f"sweep{i}", "output_dir": str(tmp_path / "runs"), "seed": i},
                          train={"batch_size": 16, "mle_steps": STEPS, "log_every": 1, "valid_every": 10},
                          model={"emb_dim": 16, "hidden_size": 16},
                          tracking={"uri": uri, "experiment": "sweep", "system_metrics_s": 0.5},
                          distributed={"deepspeed_config": str(ROOT / "configs/ds_zero2.json")})
        config = write_config(tmp_path, cfg, f"{i}.yaml")
        commands.append([PYTHON, str(ROOT / "ami_dist/train.py"), "--config", str(config), "--run_dir",
                         str(tmp_path / f"run{i}"), "train.threads_per_rank=1"])
    stop = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, uri, str(stop)], env=subprocess_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    procs = [subprocess.Popen(c, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in commands]
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-1500:] + err[-3000:]
        assert "buffering" not in err  # the store was never out of reach for long
    wall = time.monotonic() - started
    stop.touch()
    reads, reader_err = reader.communicate(timeout=120)
    assert reader.returncode == 0, reader_err[-3000:]
    assert int(reads) > 0
    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "sweep"]
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"sweep{i}" for i in range(4)]
    for run in runs:
        assert run.info.status == "FINISHED"
        for key in run.data.metrics:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), (run.info.run_name, key, steps)  # none twice
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "fw/mle_nll")) == list(
            range(1, STEPS + 1))
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "valid/fw_bleu")) == [10, 20]
        assert any(k.startswith("system/") for k in run.data.metrics)
    print(f"4 runs together with a reader: {wall:.0f} s wall, the reader listed runs {reads.strip()} times")
