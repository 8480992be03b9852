"""Runs on prepared data: the ranks of a machine prepare once (the others wait, nobody times out), and a
continuing run keeps its own vocabulary (a cleared cache is encoded again with it; a changed one is refused)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT, subprocess_env, tiny_config, write_config

LAUNCHER = str(ROOT / ".venv/bin/deepspeed") if (ROOT / ".venv/bin/deepspeed").exists() else "deepspeed"


def _train(args: list[str], expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([PYTHON, "ami_dist/train.py", *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _manifests(cache: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(cache.glob("*/manifest.json"))]


def test_a_continuing_run_keeps_its_vocabulary(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, train={"mle_steps": 6, "log_every": 1}, tracking={"enabled": False})
    _train(["--config", str(write_config(tmp_path, cfg)), "train.stop_after_steps=2"])
    run_dir = next(p for p in (tmp_path / "runs").iterdir() if not p.name.startswith("."))
    cache = tmp_path / "runs" / ".prepared"
    (trained,) = _manifests(cache)
    assert trained["vocab"]["source"] == "trained"

    shutil.rmtree(cache)  # the cache is gone (another node, a cleaned scratch disk): encode again, same vocabulary
    resumed = _train(["--resume", str(run_dir), "train.stop_after_steps=2"])
    assert "(step 4)" in resumed.stdout or "stopped after step 4" in resumed.stdout
    (again,) = _manifests(cache)
    assert again["vocab"]["source"] == "given"
    assert again["vocab"]["sha256"] == trained["vocab"]["sha256"]

    model = run_dir / "spm.model"
    data = model.read_bytes()
    model.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # a vocabulary that is not the checkpoint's
    refused = _train(["--resume", str(run_dir)], expect=2)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("ami-dist: error:")]
    assert len(errors) == 1 and "Traceback" not in refused.stderr
    assert re.search(rf"{re.escape(str(model))}: vocabulary sha256 [0-9a-f]{{12}}, but checkpoint step4 was "
                     rf"trained with {trained['vocab']['sha256'][:12]}", errors[0]), errors


@pytest.mark.distributed
def test_a_slow_prepare_trips_no_timeout_and_runs_once_per_machine(tmp_path: Path) -> None:
    # The prepare takes longer than both the collective timeout and the heartbeat timeout: it happens before
    # the ranks meet, on the rank that takes the cache's lock, while the other waits on the lock.
    cfg = tiny_config(tmp_path, model={"emb_dim": 16, "hidden_size": 16}, train={"mle_steps": 2, "log_every": 1},
                      distributed={"timeout_s": 10, "failure_timeout_s": 4}, fault={"prepare_delay_s": 14},
                      tracking={"enabled": False})
    job = subprocess.run(
        [LAUNCHER, "--num_gpus", "2", "--master_port", "29791", "ami_dist/train.py", "--deepspeed_config",
         "configs/ds_zero2.json", "--config", str(write_config(tmp_path, cfg))],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    output = job.stdout + job.stderr
    assert job.returncode == 0, output[-3000:]
    assert "finished 2 steps" in output
    assert sum(line.startswith("preparing ") for line in output.splitlines()) == 1, output[-3000:]  # one rank ...
    assert "waiting for another process preparing the same corpus" in output  # ... the other waited
    assert len(_manifests(tmp_path / "runs" / ".prepared")) == 1


@pytest.mark.distributed
def test_fewer_training_pairs_than_ranks_is_one_line_on_every_rank(tmp_path: Path) -> None:
    (tmp_path / "one.en").write_text("a small corpus\n", encoding="utf-8")
    (tmp_path / "one.de").write_text("ein kleiner Korpus\n", encoding="utf-8")
    cfg = tiny_config(tmp_path, data={"train_src": str(tmp_path / "one.en"), "train_tgt": str(tmp_path / "one.de")},
                      vocab={"kind": "words", "size": 50}, tracking={"enabled": False})
    config = write_config(tmp_path, cfg)
    procs = []
    for rank in range(2):  # two ranks as srun starts them
        env = {**subprocess_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29793"}
        procs.append(subprocess.Popen([PYTHON, "ami_dist/train.py", "--config", str(config)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, stderr[-2000:]
        errors = [line for line in stderr.splitlines() if line.startswith("ami-dist: error:")]
        assert errors == [f"ami-dist: error: {tmp_path / 'one.en'}: 1 training pairs (0 dropped as too long) for 2 "
                          "ranks; every rank needs at least one pair a step"], stderr[-2000:]
        assert "Traceback" not in stderr
    assert not [p for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")]
