"""A full disk for real: the run directory on a small tmpfs (mounted in a private mount namespace, unshare),
so that a checkpoint meets ENOSPC. The run stops with one line naming the path and the space it needed, the
previous complete checkpoint stays loadable and named by ``latest``, nothing partial is left, and the MLflow
run is FAILED with the reason."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import PYTHON, ROOT, subprocess_env, tiny_config, write_config


def _in_small_tmpfs(tmp_path: Path, size: str) -> tuple[dict[str, str], Path]:
    """Train a run whose directory is on a tmpfs of ``size``, then, in the same namespace (the tmpfs ends with
    it), export its newest complete checkpoint and list what the run directory holds."""
    small = tmp_path / "small"
    small.mkdir()
    cfg = tiny_config(tmp_path, train={"batch_size": 16, "mle_steps": 8, "log_every": 2, "save_every": 2,
                                       "keep_checkpoints": 0},
                      model={"emb_dim": 16, "hidden_size": 16}, data={"cache_dir": str(tmp_path / "prepared")},
                      distributed={"deepspeed_config": str(ROOT / "configs/ds_zero2.json")})
    config = write_config(tmp_path, cfg)
    run = small / "run"
    script = f"""
        mount -t tmpfs -o size={size} tmpfs {small} || exit 99
        {PYTHON} {ROOT / 'ami_dist/train.py'} --config {config} --run_dir {run} 2> {tmp_path / 'train.err'}
        echo "train_rc=$?"
        echo "latest=$(cat {run / 'checkpoints/latest'} 2>/dev/null)"
        echo "partial=$(find {run} -name '*.partial' | wc -l)"
        echo "tags=$(ls {run / 'checkpoints/ranks'} 2>/dev/null | tr '\\n' ' ')"
        if [ -f {run / 'checkpoints/latest'} ]; then
            {PYTHON} -m ami_dist.export {run} --no_mlflow --out {tmp_path / 'model.pt'} > /dev/null 2>&1
            echo "export_rc=$?"
        fi
    """
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    facts = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return facts, run


def _one_line(tmp_path: Path) -> str:
    err = (tmp_path / "train.err").read_text()
    assert "Traceback" not in err, err[-3000:]
    (line,) = [x for x in err.splitlines() if x.startswith("ami-dist: error:")]
    return line


def _mlflow_run(tmp_path: Path, run: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    return found


@pytest.mark.distributed
def test_a_checkpoint_that_does_not_fit_stops_the_run_and_keeps_the_last_one(tmp_path: Path) -> None:
    facts, run = _in_small_tmpfs(tmp_path, "3m")  # two checkpoints of this model fit, a third does not
    assert facts["train_rc"] == "1"
    line = _one_line(tmp_path)
    found = re.search(r"checkpoints: no space left on the device for checkpoint step(\d+) \(it needs about "
                      r"[\d.]+ MiB, the size of step(\d+); [\d.]+ MiB free\): the run stops; checkpoint step(\d+) is "
                      r"complete and \S+/checkpoints/latest names it", line)
    assert found, line
    failed, measured, kept = (int(g) for g in found.groups())
    assert measured == kept == failed - 2 and facts["latest"] == f"step{kept}"
    assert facts["partial"] == "0"
    assert facts["export_rc"] == "0"  # the kept checkpoint loads (consolidated from its shards)
    assert facts["tags"].split() == [f"step{s}" for s in range(2, kept + 1, 2)]
    mlflow_run = _mlflow_run(tmp_path, run)
    assert mlflow_run.info.status == "FAILED"
    assert "no space left on the device" in mlflow_run.data.tags["failure_reason"]


@pytest.mark.distributed
def test_a_first_checkpoint_that_runs_out_of_space_leaves_nothing_partial(tmp_path: Path) -> None:
    facts, run = _in_small_tmpfs(tmp_path, "600k")  # the first checkpoint itself does not fit: ENOSPC mid-write
    assert facts["train_rc"] == "1"
    line = _one_line(tmp_path)
    assert re.search(r"checkpoints: no space left on the device for checkpoint step2 \(it ran out after [\d.]+ MiB; "
                     r"[\d.]+ MiB free\): the run stops; no earlier checkpoint was completed", line), line
    assert facts["latest"] == "" and facts["partial"] == "0" and facts["tags"] == ""
    assert _mlflow_run(tmp_path, run).info.status == "FAILED"


def test_an_export_that_does_not_fit_is_one_line_and_leaves_the_earlier_file(finished_run: Path,
                                                                              tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    out = small / "model.pt"
    script = f"""
        mount -t tmpfs -o size=200k tmpfs {small} || exit 99
        echo earlier > {out}
        cd {finished_run} && {PYTHON} -m ami_dist.export run --no_mlflow --out {out} 2> {tmp_path / 'export.err'}
        echo "export_rc=$?"
        echo "kept=$(cat {out})"
        echo "tmp=$(ls {small} | grep -c tmp)"
    """
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT,
                          env={**subprocess_env(), "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=300)
    facts = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    assert facts["export_rc"] == "2", proc.stdout + proc.stderr
    err = (tmp_path / "export.err").read_text()
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("ami-dist: error:")]
    assert re.search(rf"{out}: no space left on the device \(the file needs about [\d.]+ MiB; it ran out after "
                     r"[\d.]+ MiB, [\d.]+ MiB free\); the earlier file is untouched", line), line
    assert facts["kept"] == "earlier" and facts["tmp"] == "0"


def test_a_prepared_data_cache_that_does_not_fit_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    cfg = tiny_config(tmp_path, data={"cache_dir": str(small / "prepared")},
                      distributed={"deepspeed_config": str(ROOT / "configs/ds_zero2.json")})
    config = write_config(tmp_path, cfg)
    script = f"""
        mount -t tmpfs -o size=300k tmpfs {small} || exit 99
        {PYTHON} {ROOT / 'ami_dist/train.py'} --config {config} --run_dir {tmp_path / 'run'} 2> {tmp_path / 'err'}
        echo "train_rc=$?"
        echo "partial=$(find {small} -path '*.tmp-*' | wc -l)"
        echo "prepared=$(find {small}/prepared -maxdepth 1 -type d ! -name digests ! -name prepared | wc -l)"
    """
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    facts = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    err = (tmp_path / "err").read_text()
    assert facts["train_rc"] == "2" and "Traceback" not in err, err[-3000:]
    (line,) = [x for x in err.splitlines() if x.startswith("ami-dist: error:")]
    assert re.search(rf"{small / 'prepared'}: no space left on the device preparing the corpus \([\d.]+ MiB of text; "
                     r"it ran out after writing [\d.]+ MiB, [\d.]+ MiB free\): set data.cache_dir", line), line
    # nothing half-written stays (the inputs' digest cache, complete small files, may)
    assert facts["partial"] == "0" and facts["prepared"] == "0", proc.stdout
