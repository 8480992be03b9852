"""SIGKILL a 2-rank run at random moments: the restart always resumes from the newest complete checkpoint
(never a partial one), and from there its losses equal an uninterrupted run's to 1e-6."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, subprocess_env, tiny_config, write_config

pytestmark = pytest.mark.distributed

LAUNCHER = str(ROOT / ".venv/bin/deepspeed") if (ROOT / ".venv/bin/deepspeed").exists() else "deepspeed"
TOTAL = 26  # 12 MLE + 2 noise pretraining + 2 cycles of 6


def _command(config: Path, run_dir: Path, port: int) -> list[str]:
    return [LAUNCHER, "--num_gpus", "2", "--master_port", str(port), "ami_dist/train.py", "--deepspeed_config",
            "configs/ds_zero2.json", "--config", str(config), "--run_dir", str(run_dir)]


def _history(uri: str, experiment: str) -> dict[str, dict[int, float]]:
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    out = {}
    for key in run.data.metrics:
        if key == "train/tgt_tokens_per_s" or key.startswith("system/"):  # timings and sampled machine use
            continue
        # a step logged before the kill and again after the restart: the later value is the one that counts
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp)
        out[key] = {m.step: m.value for m in history}
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("crash")
    cfg = tiny_config(
        tmp,
        train={"batch_size": 16, "mle_steps": 12, "log_every": 1, "save_every": 1, "keep_checkpoints": 2},
        model={"emb_dim": 16, "hidden_size": 16, "dropout": 0.1},
        optim={"name": "adam", "lr": 0.003}, lns={"k": 2},
        ami={"enabled": True, "noise_pretrain_steps": 2, "cycles": 2, "noise_steps": 2, "forward_steps": 2,
             "backward_steps": 2},
        tracking={"experiment": "whole"},
    )
    proc = subprocess.run(_command(write_config(tmp, cfg, "whole.yaml"), tmp / "whole", 29680), cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"tmp": tmp, "cfg": cfg, "reference": _history(cfg["tracking"]["uri"], "whole")}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_a_random_moment_then_resume(setup: dict, seed: int) -> None:
    tmp, cfg = setup["tmp"], dict(setup["cfg"])
    cfg["tracking"] = {**cfg["tracking"], "experiment": f"killed-{seed}"}
    config = write_config(tmp, cfg, f"killed-{seed}.yaml")
    run_dir = tmp / f"killed-{seed}"
    job = subprocess.Popen(_command(config, run_dir, 29681 + 2 * seed), cwd=ROOT, env=subprocess_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = run_dir / "checkpoints" / "latest"
    rng = random.Random(seed)
    target = rng.randint(2, TOTAL - 6)  # a checkpoint somewhere in MLE pretraining or the AMI cycles
    deadline = time.monotonic() + 300
    while not latest.exists() or int(latest.read_text().strip().removeprefix("step")) < target:
        assert job.poll() is None, f"the run ended before its checkpoint at step {target}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.5))  # somewhere in the following step or its save
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    tag = latest.read_text().strip()
    step = int(tag.removeprefix("step"))
    assert 0 < step < TOTAL, "the kill must land in the middle of the run"
    ckpt = run_dir / "checkpoints"
    for name in ("forward", "backward", "noise"):  # what `latest` names is complete
        assert len(list((ckpt / name / tag).glob("zero_pp_rank_*_optim_states.pt"))) == 2
        assert (ckpt / name / tag / "mp_rank_00_model_states.pt").is_file()
    assert sorted(p.name for p in (ckpt / "ranks" / tag).iterdir()) == ["rank0.pt", "rank1.pt"]

    restart = subprocess.run(_command(config, run_dir, 29691 + 2 * seed), cwd=ROOT, env=subprocess_env(),
                             capture_output=True, text=True, timeout=900)
    assert restart.returncode == 0, restart.stderr[-3000:]
    assert f"from checkpoint {tag} (step {step})" in restart.stdout
    assert not list(ckpt.glob("*/*.partial")), "an interrupted save left its partial files behind"
    reference, resumed = setup["reference"], _history(cfg["tracking"]["uri"], f"killed-{seed}")
    compared = 0
    for key, steps in reference.items():
        for s, value in steps.items():
            if s > step:
                assert resumed[key][s] == pytest.approx(value, rel=1e-6, abs=1e-6), (key, s)
                compared += 1
    assert compared > 0
